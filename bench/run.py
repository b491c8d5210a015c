"""`python3 -m bench.run`: every benchmark in one go, as root, on this machine.

Prints a table and comparison lines, writes bench/results/results.json and PNG plots
(latency distributions; throughput against concurrency; root memory; ours beside
upstream's MEP, bench/compare.py). docs/performance.md explains what each figure measures
and the goals. `--quick` runs a small version (a smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import sys
import time

from bench import compare, e2e, fixture, memory, mep, sessions, spawn, surface, thousand

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024  # the smallest growth VmRSS can show


def percentiles(samples_ns: list) -> dict:
    q = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return {"n": len(samples_ns), "p50_ms": q[49] / 1e6, "p95_ms": q[94] / 1e6, "p99_ms": q[98] / 1e6}


def concurrency_curve(fx, levels, total, say) -> dict:
    curve = {"helper (PAM off)": {}, "runuser": {}}
    for level in levels:
        say(f"throughput at concurrency {level}")
        curve["helper (PAM off)"][level] = asyncio.run(
            spawn.helper_burst(fx.policy_nopam, fx.key, fx.accounts, total, level))
        curve["runuser"][level] = asyncio.run(spawn.baseline_burst(
            lambda u: spawn.baselines(u, fx.probe)["runuser"], fx.accounts, total, level))
    return curve


def plots(results: dict, out: pathlib.Path) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    raw = results["spawn"]["latency_ns"]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.boxplot([[v / 1e6 for v in raw[k]] for k in raw], tick_labels=list(raw), showfliers=True)
    ax.set_ylabel("spawn latency, ms (request -> probe's first instruction)")
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    latency_png = out / "spawn_latency.png"
    fig.savefig(latency_png, dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in results["throughput_vs_concurrency"].items():
        levels = sorted(points, key=int)
        ax.plot([int(c) for c in levels], [points[c] for c in levels], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("spawns per second")
    ax.legend()
    fig.tight_layout()
    throughput_png = out / "spawn_throughput.png"
    fig.savefig(throughput_png, dpi=110)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, run in results["root_memory"].items():
        ax.plot([p["t_s"] for p in run["series"]], [p["root_pss_mib"] for p in run["series"]], label=name)
        ax2.plot([p["t_s"] for p in run["series"]], [p["helper_cpu_s"] for p in run["series"]], label=name)
    ax.set_xlabel("s since the first spawn request")
    ax.set_ylabel("root PSS, MiB (helper + session processes)")
    ax2.set_xlabel("s since the first spawn request")
    ax2.set_ylabel("helper CPU, s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    memory_png = out / "root_memory.png"
    fig.savefig(memory_png, dpi=110)
    return [str(latency_png), str(throughput_png), str(memory_png), compare.plot(results["compare"], out)]


def table(results: dict) -> str:
    lat = results["spawn"]["latency"]
    bare = lat["bare fork+setuid+exec"]["p50_ms"]
    rows = [f"{'spawn latency':28} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'x bare fork':>12}"]
    for name, s in lat.items():
        rows.append(f"{name:28} {s['n']:>5} {s['p50_ms']:>8.2f} {s['p95_ms']:>8.2f} {s['p99_ms']:>8.2f} "
                    f"{s['p50_ms'] / bare:>12.2f}")
    rows.append("")
    rows.append(f"{'spawn throughput (burst)':28} {'spawns/s':>9} {'x runuser':>10}")
    tput = results["spawn"]["throughput_per_s"]
    for name, rate in tput.items():
        rows.append(f"{name:28} {rate:>9.0f} {rate / tput['runuser']:>10.2f}")
    mem, m = results["memory"], results["mep"]
    rows.append("")
    rows.append(f"MEP overhead (command published -> UEP exec'd, {m['offered_per_s']:.0f}/s offered): "
                f"n {m['latency']['n']}, p50 {m['latency']['p50_ms']:.1f} ms, p95 {m['latency']['p95_ms']:.1f} ms, "
                f"p99 {m['latency']['p99_ms']:.1f} ms")
    e = results["e2e"]
    rows.append(f"end to end (SDK submit -> result): cold p50 {e['cold']['p50_ms'] / 1000:.2f} s "
                f"(MEP's share {e['cold_start_mep_share']:.0%}), warm p50 {e['warm']['p50_ms']:.0f} ms, "
                f"p99 {e['warm']['p99_ms']:.0f} ms; {e['tasks_per_s']:.0f} tasks/s through one warm UEP")
    rows.append("broker RSS: " + ", ".join(f"{k.removesuffix('_kib')} {v / 1024:.1f} MiB"
                                         for k, v in m["broker_memory"].items()))
    sizes = ", ".join(f"{k.removesuffix('_kib')} {v / 1024:.1f} MiB" for k, v in mem.items()
                      if k.endswith("_kib") and k != "growth_kib")
    rows.append(f"helper RSS: {sizes}; growth {mem['growth_kib']} KiB over {mem['cycles']} cycles")
    rows.append("")
    rows.append(f"{'live UEPs (helper, probes)':28} {'spawns/s':>9} {'helper CPU s':>13} {'root PSS MiB':>13} "
                f"{'KiB per UEP':>12} {'reaped after TERM s':>20}")
    for name, r in results["root_memory"].items():
        rows.append(f"{name:28} {r['spawns_per_s']:>9.0f} {r['helper_cpu_s_for_spawns']:>13.2f} "
                    f"{r['live']['root_pss_kib'] / 1024:>13.1f} {r['root_pss_per_uep_kib']:>12.0f} "
                    f"{r['all_exited_after_term_s']:>20.2f}")
    k = results["many_ueps"]
    rows.append(f"{k['n']} live UEPs on one MEP: started in {k['all_started_s']:.1f} s ({k['starts_per_s']:.0f}/s); "
                f"mepctl list max {k['mepctl_list_s']['max']:.2f} s (complete: {k['list_complete']}), status max "
                f"{k['mepctl_status_s']['max']:.2f} s; SIGHUP kept all: {k['after_hup']['same_session_processes']}; "
                f"stop {k['stop_s']:.1f} s, {k['probes_left_after_stop']} left")
    s = results["surface"]
    rows.append(f"root surface: ours {s['ours']['total']['modules']} modules / {s['ours']['total']['lines']:,} lines "
                f"({s['ours']['root_part_lines']:,} of our own); upstream's root MEP {s['upstream']['total']['modules']} "
                f"modules / {s['upstream']['total']['lines']:,} lines "
                f"({s['upstream']['total']['lines'] / s['ours']['total']['lines']:.1f}x)")
    return "\n".join(rows)


def comparisons(results: dict) -> list:
    lat, tput, mem = results["spawn"]["latency"], results["spawn"]["throughput_per_s"], results["memory"]
    overhead = lat["helper (PAM off)"]["p50_ms"] - lat["bare fork+setuid+exec"]["p50_ms"]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return [
        f"privilege-separation overhead over the bare fork path at p50: {overhead:.2f} ms "
        f"(goal < 2 ms: {verdict(overhead < 2)})",
        f"helper with PAM vs runuser at p50: {lat['helper (PAM on)']['p50_ms']:.2f} vs {lat['runuser']['p50_ms']:.2f} ms "
        f"({lat['helper (PAM on)']['p50_ms'] / lat['runuser']['p50_ms']:.2f}x; reported, no longer a goal; the same session "
        "stack, plus the account check runuser skips; upstream's way, one fork with PAM in the child: "
        f"{lat['bare fork+PAM+setuid+exec']['p50_ms']:.2f} ms, "
        f"{lat['bare fork+PAM+setuid+exec']['p50_ms'] / lat['runuser']['p50_ms']:.2f}x runuser)",
        f"burst throughput: {tput['helper (PAM off)']:.0f}/s without PAM (goal >= 200: "
        f"{verdict(tput['helper (PAM off)'] >= 200)}), {tput['helper (PAM on)']:.0f}/s with PAM (goal >= 100: "
        f"{verdict(tput['helper (PAM on)'] >= 100)})",
        f"MEP overhead at 50 commands/s: p50 {results['mep']['latency']['p50_ms']:.1f} ms (goal < 15: "
        f"{verdict(results['mep']['latency']['p50_ms'] < 15)}), p99 {results['mep']['latency']['p99_ms']:.1f} ms "
        f"(goal < 50: {verdict(results['mep']['latency']['p99_ms'] < 50)})",
        "root PSS per live UEP (goal <= 256 KiB, PAM off and on): " + ", ".join(
            f"{name} {r['root_pss_per_uep_kib']:.0f} KiB ({verdict(r['root_pss_per_uep_kib'] <= 256)})"
            for name, r in results["root_memory"].items()),
        f"helper RSS idle {mem['idle_kib'] / 1024:.1f} MiB (goal < 20 MB: {verdict(mem['idle_kib'] * 1024 < 20e6)}); "
        f"growth {mem['growth_kib']} KiB over {mem['cycles']} spawn-and-reap cycles (goal: none, that is at most "
        f"the one page RSS can show; one 16-byte object a cycle would be {16 * mem['cycles'] // 1024} KiB: "
        f"{verdict(mem['growth_kib'] <= PAGE_KIB)})",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small counts: a smoke test, not a measurement")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    sizes = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    p.add_argument("--compare-reps", type=int, default=3, metavar="N",
                   help="ours vs upstream: cold starts each (after one warm-up each); default 3")
    p.add_argument("--compare-bursts", type=sizes, default=(20, 50), metavar="N,N",
                   help="ours vs upstream: burst sizes (users at once, real UEPs); default 20,50")
    p.add_argument("--compare-live", type=sizes, default=(20, 200), metavar="N,N",
                   help="ours vs upstream: live probe UEPs at which PSS is taken; default 20,200")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.run: run as root (it creates users, PAM services and helper policies)", file=sys.stderr)
        return 77
    n, burst, cycles, levels, commands, e2e_counts, live = (
        (30, 100, 300, (1, 8), 50, (2, 3, 20), (10,)) if args.quick else
        (300, 500, 10000, (1, 4, 16, 64, 256), 500, (10, 50, 500), (100, 1000)))
    side_by_side = ({"reps": 1, "bursts": (2,), "live": (2, 4)} if args.quick else
                    {"reps": args.compare_reps, "bursts": args.compare_bursts, "live": args.compare_live})
    say = lambda text: print(f"[bench] {text}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.monotonic()
    results = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
               "quick": args.quick}
    with fixture.Fixture(users=50) as fx:
        raw = spawn.measure(fx, n, burst, say)
        results["spawn"] = {"latency": {k: percentiles(v) for k, v in raw["latency_ns"].items()},
                            "throughput_per_s": raw["throughput_per_s"], "latency_ns": raw["latency_ns"]}
        results["throughput_vs_concurrency"] = concurrency_curve(fx, levels, burst, say)
        results["memory"] = memory.measure(fx, cycles, say)
        results["root_memory"] = sessions.measure(fx, live, say)
        results["many_ueps"] = thousand.measure(fx, live[-1], say)
        overhead = mep.measure(fx, commands, 50, 100, say)
        results["mep"] = {"latency": percentiles(overhead.pop("latency_ns")), **overhead}
        end = e2e.measure(fx, *e2e_counts, say=say)
        split = end.pop("cold_start_split")
        results["e2e"] = {"cold": percentiles(end.pop("cold_ns")), "warm": percentiles(end.pop("warm_ns")), **end,
                          "cold_start_mep_share": statistics.median(x["mep_s"] / (x["mep_s"] + x["uep_s"])
                                                                    for x in split),
                          "cold_start_split_s": split}
        results["compare"] = compare.measure(fx, say=say, **side_by_side)
    results["surface"] = surface.measure(say)
    results["seconds"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots(results, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print()
    print(compare.table(results["compare"]))
    print()
    for line in comparisons(results):
        print(line)
    print(f"\nJSON: {args.out / 'results.json'}; plots: {', '.join(results['plots']) or '(matplotlib missing)'}; "
          f"{results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
