"""No orphaned batch jobs: when a user endpoint ends, for any reason, cancel the jobs it left.

A UEP whose block runs on a batch scheduler cancels that block itself when it shuts down
cleanly; killed (SIGKILL, the OOM killer, the MEP's own stop after the grace period) it
cannot, and the job would run on until the worker pool's heartbeat limit or its walltime.
The process-tree invariant of the helper stops at the scheduler: the job's processes are
the scheduler's children, not the UEP's.

So, when a UEP whose rendered config names a Slurm provider exits, the broker asks the
helper for one more spawn of the same program for the same user and the same UEP name,
with CLEANUP_ENV set to the pid of the UEP that ended. The launcher (scripts/uep-start.sh, installed as mep-uep-start) sees it and, instead
of starting an endpoint, runs `scancel --user=<self> --jobname=<tag>` as the user: every
UEP it starts exports SBATCH_JOB_NAME=<tag> (`gc-uep.<pid>.<name>`), which sbatch gives
as the name of every job that UEP submits. Nothing here or in the root helper reads
scheduler output; the user's own scancel can only cancel the user's own jobs; the tag
holds the pid, so a new UEP of the same name (a replayed start) keeps its jobs.
docs/decisions.md says why this design and not another.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from broker.helper_client import HelperGone, HelperRefused

CLEANUP_ENV = "MEP_UEP_CLEANUP"  # read by scripts/uep-start.sh: the pid of the UEP whose jobs to cancel
# Providers whose jobs the launcher knows how to cancel (it runs scancel); a UEP whose
# rendered config names none of them gets no cleanup spawn.
BATCH_PROVIDERS = frozenset({"SlurmProvider"})


def batch_provider(config: dict) -> str | None:
    """The provider type of a rendered config if it is one in BATCH_PROVIDERS."""
    engine = config.get("engine")
    provider = engine.get("provider") if isinstance(engine, dict) else None
    kind = provider.get("type") if isinstance(provider, dict) else None
    return kind if kind in BATCH_PROVIDERS else None


class BatchCleanup:
    """Starts a cleanup for each UEP that ends and tracks it until it exits."""

    def __init__(self, helper, log, environment: Callable[[], dict]):
        self.helper, self.log, self.environment = helper, log, environment
        self.running: dict[int, object] = {}  # pid of a cleanup process -> the UEP it cleans up after
        self._early: dict[int, int] = {}  # exits seen before their spawn's answer was handled: pid -> status
        self._tasks: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def watch(self, uep, config: dict) -> None:
        """Called when a UEP has started with the rendered `config`: mark it if its
        engine submits batch jobs."""
        uep.batch = batch_provider(config)  # on the UEP record, so that a re-exec'd broker keeps it

    def uep_exited(self, uep) -> None:
        """Called from the MEP's exit handler: cancel, as uep's user, the jobs uep left."""
        if uep.batch is None:
            return
        self._idle.clear()
        task = asyncio.ensure_future(self._start(uep))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _start(self, uep) -> None:
        try:
            env = {**self.environment(), CLEANUP_ENV: str(uep.pid)}
        except Exception as e:  # noqa: BLE001 - a broken user_environment.yaml: scancel would lack its settings
            self.log.error("batch job cleanup not started: the user environment file is unreadable", uep=uep.name,
                           user=uep.username, error=str(e))
            return
        try:
            result = await self.helper.spawn(uep.username, uep.uid, uep.name, env, b"", ())
        except (HelperRefused, HelperGone) as e:
            self.log.error("batch job cleanup not started; jobs of the user endpoint may be left running",
                           uep=uep.name, user=uep.username, uep_pid=uep.pid, reason=str(e))
            return
        self.running[result.pid] = uep
        self.log.info("batch job cleanup started", pid=result.pid, uep=uep.name, user=uep.username, uep_pid=uep.pid)
        if result.pid in self._early:  # it ended before this coroutine resumed
            self.on_exit(result.pid, self._early.pop(result.pid))

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            for pid, status in self._early.items():
                self.log.warning("exit of an unknown process", pid=pid, status=status)
            self._early.clear()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._tasks and not self.running:
            self._idle.set()

    def on_exit(self, pid: int, status: int) -> bool:
        """The helper's exit event for a pid that is no UEP: True if it is (or, while a
        spawn's answer is still on its way, may be) a cleanup process; then it is handled."""
        uep = self.running.pop(pid, None)
        if uep is None:
            if self._tasks:  # the `spawned` answer and this exit came in one read
                self._early[pid] = status
                return True
            return False
        if status == 0:
            self.log.info("batch jobs of the user endpoint cancelled", pid=pid, uep=uep.name, user=uep.username,
                          uep_pid=uep.pid)
        else:
            self.log.error("batch job cleanup failed; see the user endpoint's endpoint.log", pid=pid, status=status,
                           uep=uep.name, user=uep.username, uep_pid=uep.pid)
        self._check_idle()
        return True

    async def finish(self, mep, timeout: float = 30.0) -> None:
        """At the MEP's stop, after its grace period: KILL the UEPs still running (so that
        their exits, and so their cleanups, happen while the helper still serves us) and
        wait for every cleanup to end. UEPs without batch jobs are left to the helper."""
        batch = [uep for uep in mep.uep if uep.batch is not None]
        for uep in batch:
            try:
                await self.helper.signal(uep.pid, "KILL")
            except HelperRefused:  # it exited meanwhile
                pass
            except HelperGone:
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(mep.uep.by_pid.get(u.pid) is u for u in batch) and loop.time() < deadline and not self.helper.closed.done():
            await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            self.log.error("batch job cleanups still running at stop", pids=sorted(self.running))
