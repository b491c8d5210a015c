"""The foreground display, as upstream's MEP shows it: the endpoint id once, then a
timer line rewritten in place every second. Only on a terminal: in a log file or a
journal a line rewritten with \\r is noise."""

from __future__ import annotations

import asyncio
import time


def banner(endpoint_id: str, log_to_console: bool = False) -> str:
    """The seed's lines: the id on a terminal; with --log-to-console the "begins" line first."""
    begins = f"\n========== Endpoint Manager begins: {endpoint_id}\n" if log_to_console else ""
    return f"{begins}        >>> Multi-User Endpoint ID: {endpoint_id} <<<"


def timer_line(now: float, started: float, ueps: int) -> str:
    up = int(now - started)
    clock = time.strftime("%c", time.localtime(now))
    return f"  ----> {clock}  up {up // 3600}:{up // 60 % 60:02d}:{up % 60:02d}  user endpoints: {ueps}\r"


async def run_timer(out, mep, interval: float = 1.0) -> None:
    """Until cancelled; `out` is a terminal (the caller checked isatty)."""
    try:
        while True:
            out.write(timer_line(time.time(), mep.started, len(mep.uep)))
            out.flush()
            await asyncio.sleep(interval)
    finally:
        out.write("\n")
        out.flush()
