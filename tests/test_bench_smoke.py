"""bench/ must keep working: its quick mode runs every benchmark once, small, as root.
No timing is asserted here (speed is measured by `python3 -m bench.run`, never by tests);
this checks that each measurement happened and is self-consistent."""

import json
import subprocess
import sys

import pytest

from tests.rigs.helper import ROOT

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_quick_benchmark_produces_every_figure(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    latency = results["spawn"]["latency"]
    assert set(latency) == {"helper (PAM off)", "helper (PAM on)", "runuser", "setpriv", "sudo",
                            "bare fork+setuid+exec", "bare fork+PAM+setuid+exec"}
    for name, s in latency.items():
        assert s["n"] == 30 and 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"], (name, s)
    assert all(rate > 0 for rate in results["spawn"]["throughput_per_s"].values())
    assert results["memory"]["idle_kib"] > 0 and "with_100_children_kib" in results["memory"]
    assert results["e2e"]["cold"]["n"] == 2 and results["e2e"]["warm"]["n"] == 3 and results["e2e"]["tasks_per_s"] > 0
    assert 0 < results["e2e"]["cold_start_mep_share"] < 1
    assert results["mep"]["latency"]["n"] == 50 and results["mep"]["broker_memory"]["with_100_ueps_kib"] > 0
    assert set(results["root_memory"]) == {"10 live, PAM off", "10 live, PAM on"}
    for name, r in results["root_memory"].items():  # every session process counted, and its memory
        assert r["live"]["sessions"] == 10 and r["live"]["sessions_pss_kib"] > 0 and r["series"], name
    many = results["many_ueps"]  # the real MEP with 10 live UEPs: listed, kept by a SIGHUP, ended by a stop
    assert many["list_complete"] and many["status_complete"] and many["after_hup"]["same_session_processes"]
    assert many["after_hup"]["listed"] == 10 and many["probes_left_after_stop"] == 0
    side = results["compare"]  # ours beside upstream's MEP, tiny: a warm-up, a cold start, a burst of 2, 4 probes
    assert side["hangs"]["ours"]["starts"] == side["hangs"]["upstream"]["starts"] == 8, side["hangs"]
    assert side["memory"]["4 probe UEPs"]["upstream"]["root_kib"] > 0 == side["memory"]["idle"]["upstream"]["broker_kib"]
    ours_side = side["hangs"]["ours"]  # upstream's own hangs (it had some) are reported, never asserted
    assert ours_side["no_result"] == ours_side["no_exec"] == ours_side["orphans"] == 0, ours_side
    assert side["cold"]["ours"][0]["all_results_s"] > 0 and side["memory"]["idle"]["ours"]["broker_kib"] > 0
    assert side["memory"]["4 probe UEPs"]["ours"]["uep_processes"] >= 4
    assert all(r["ours"] is not None for r in side["summary"].values()), side["summary"]
    ours, upstream = results["surface"]["ours"], results["surface"]["upstream"]
    assert ours["third-party"]["modules"] == 0 and upstream["total"]["modules"] > ours["total"]["modules"]
    assert all(p.endswith(".png") and (tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 0 for p in results["plots"])
    assert "privilege-separation overhead over the bare fork path" in out.stdout
