"""Mutation testing of the root part (protocol/ and privhelper/): do its tests catch what they claim to?

    nice python bench/mutate.py                      # every root module, fast tests, then root tests for survivors
    nice python bench/mutate.py protocol/messages.py --no-root
    python bench/mutate.py --list privhelper/policy.py
    python bench/mutate.py --only privhelper/policy.py:17

Why a script of our own and not mutmut: the helper's tests run the helper as `python3 -I -S` from a
root-owned copy of the packages (tests/rigs/helper.py), so a mutant must be a plain source file on disk, not a
trampoline that imports mutmut. Here each mutant is one AST-level change, written into a scratch copy of
the checkout (outside the worktree: nothing here edits it); the chosen tests run there with -x and the
file is restored. A mutant is killed when the tests fail (or time out), survived when they pass.

Two tiers of tests per module (TESTS below): the fast tier creates no users and runs without the lock;
a mutant that survives it runs the root tier (real users, the real helper), each run under the
project's global lock /tmp/mep-tests.lock, as docs/mutation.md and the developers' brief require.
Runs by hand, never in CI; results and the survivors go to --report (JSON). See docs/mutation.md.
"""

import argparse
import ast
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/opt/mep/venv/bin/python"
LOCK = "/tmp/mep-tests.lock"  # the project's global test lock (see the developers' brief)
# --isolate: the scratch copy's tests make `mepm-` users under a lock of their own, so a run of
# hours shares the machine with the other engineers' runs instead of taking their lock.
# Two runs at once (over different modules) take two prefixes of the rig's length: --isolate mepn-
ISOLATED_PREFIX = "mepm-"
# ...except a test that makes accounts with fixed uids, which two rigs cannot both create
ISOLATED_DESELECT = ["tests/test_who.py::test_reserved_and_top_uids_with_real_accounts"]
OVERRIDE = None  # --fast-tests / --root-tests: one pair of tiers for every module
ROOT_MODULES = sorted(str(p.relative_to(ROOT)) for d in ("protocol", "privhelper") for p in (ROOT / d).glob("*.py"))

# module -> (fast tests: no users, no lock; root tests: real users and helpers, under the lock)
_RACE = "tests/faults/test_hostile_starts.py::test_signals_racing_uep_exits_never_end_the_helper"
_SEED = "tests/test_seed_running.py::"  # launch mode: the stop and HUP forwarding, the second stop, the titles
_LAUNCH_SIGNALS = [_SEED + "test_a_second_stop_signal_to_the_root_pid_is_the_administrator_insisting",
                   _SEED + "test_a_stop_signal_to_the_root_pid_stops_the_mep_cleanly",
                   _SEED + "test_sighup_to_either_pid_hot_restarts_and_keeps_every_uep",
                   _SEED + "test_the_seeds_ps_recipe_shows_the_mep_its_two_halves_and_every_uep"]
_FAST_PROTOCOL = ["tests/test_protocol_edges.py", "tests/test_protocol.py"]
_UEP_FDS = "tests/test_child.py::test_only_expected_fds_are_open"  # CHANNEL_FDS: the fd numbers the UEP finds its channels at
_BROKER_ENV = "tests/test_child_direct.py::test_launch_mode_gives_the_broker_exactly_the_documented_environment"
TESTS = {
    "protocol/": (_FAST_PROTOCOL, ["tests/test_channel.py", _UEP_FDS]),
    "privhelper/authorize.py": (["tests/test_authorize.py"], ["tests/test_who.py"]),
    "privhelper/policy.py": (["tests/test_policy_load.py", "tests/test_authorize.py", _BROKER_ENV], ["tests/test_policy.py", "tests/test_who.py"]),
    "privhelper/child.py": (["tests/test_child_direct.py", "tests/test_authorize.py"], ["tests/test_child.py", "tests/test_lifetime.py"]),
    # (in each tier the quickest tests come first: with -x a killed mutant stops at its first failure)
    "privhelper/monitor.py": (["tests/test_monitor_edges.py"], ["tests/test_helper_edges.py", "tests/test_channel.py", "tests/test_child.py",
                                   "tests/test_lifetime.py", "tests/test_pam.py", "tests/test_policy.py", "tests/test_who.py",
                                   *_LAUNCH_SIGNALS, _RACE]),
    "privhelper/pam.py": ([], ["tests/test_pam.py"]),
    "privhelper/launch.py": ([_BROKER_ENV], ["tests/test_lifetime.py", *_LAUNCH_SIGNALS]),
    "privhelper/__main__.py": ([], ["tests/test_policy.py"]),
    "privhelper/activation.py": ([], ["tests/test_channel.py"]),
    "privhelper/linux.py": (["tests/test_child_direct.py", "tests/test_monitor_edges.py"], ["tests/test_child.py"]),
    "privhelper/log.py": ([], ["tests/test_lifetime.py"]),
    "privhelper/__init__.py": ([], []),
    "protocol/__init__.py": ([], []),
}


def tests_for(module: str) -> tuple:
    if OVERRIDE:
        return OVERRIDE
    return TESTS.get(module) or TESTS.get(module.split("/")[0] + "/", ([], []))


# -- mutants ---------------------------------------------------------------------------------------

_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult, ast.LShift: ast.RShift,
        ast.RShift: ast.LShift, ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr, ast.Mod: ast.Mult}


class Mutant:
    def __init__(self, module, lineno, col, end_lineno, end_col, old, new, what):
        self.module, self.lineno, self.col, self.end_lineno, self.end_col = module, lineno, col, end_lineno, end_col
        self.old, self.new, self.what = old, new, what
        self.id = None

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line.encode()))
        raw = source.encode()
        start = offsets[self.lineno - 1] + self.col
        end = offsets[self.end_lineno - 1] + self.end_col
        assert raw[start:end].decode() == self.old, (self.id, raw[start:end], self.old)
        return (raw[:start] + self.new.encode() + raw[end:]).decode()

    def describe(self) -> str:
        old = self.old if len(self.old) < 90 else self.old[:87] + "..."
        new = self.new if len(self.new) < 90 else self.new[:87] + "..."
        return f"{self.id} line {self.lineno}: {self.what}: {old!r} -> {new!r}"


def _docstrings(tree) -> set:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def _regex_mutants(pattern: str):
    """Weaken a regex the way a careless edit would: let `/` into a character class, or move a bound by one."""
    for m in re.finditer(r"\[([^\]]*)\]", pattern):
        if "/" not in m.group(1):
            yield pattern[:m.end() - 1] + "/" + pattern[m.end() - 1:], f"regex class {m.group(0)} also allows '/'"
    for m in re.finditer(r"\{(\d+),(\d+)\}", pattern):
        lo, hi = int(m.group(1)), int(m.group(2))
        for new_lo, new_hi in ((lo, hi + 1), (lo, hi - 1)) + (((lo - 1, hi),) if lo else ((lo + 1, hi),)):
            yield pattern[:m.start()] + f"{{{new_lo},{new_hi}}}" + pattern[m.end():], f"regex bound {m.group(0)} -> {{{new_lo},{new_hi}}}"


def _is_log_call(node) -> bool:
    f = node.func if isinstance(node, ast.Call) else None
    return isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "log"


def _const_int(node):
    """The value of an expression made only of int constants and arithmetic, else None."""
    if isinstance(node, ast.Constant):
        return node.value if type(node.value) is int else None
    if isinstance(node, ast.BinOp) and (a := _const_int(node.left)) is not None and (b := _const_int(node.right)) is not None:
        return eval(compile(ast.fix_missing_locations(ast.Expression(ast.BinOp(ast.Constant(a), node.op, ast.Constant(b)))),
                            "<const>", "eval"))
    return None


def _is_text(node) -> bool:
    return isinstance(node, ast.JoinedStr) or isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))


def mutants_of(module: str, source: str) -> list:
    tree = ast.parse(source)
    docs, out = _docstrings(tree), []
    in_fstring, regex_args, skip, folded = set(), set(), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            in_fstring.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "compile" and node.args:
            regex_args.add(id(node.args[0]))
        if _is_log_call(node) or isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.AnnAssign) and node.value is None):
            skip.update(id(n) for n in ast.walk(node))  # log text is prose (dropping the call is still a mutant); imports
            # and bare annotations do nothing to mutate
        for annotation in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if annotation is not None:  # a parameter's, a return's or an assignment's type: never evaluated at run time
                skip.update(id(n) for n in ast.walk(annotation))
        if isinstance(node, ast.BinOp) and id(node) not in skip and _const_int(node) is not None:
            folded.append(node)  # `(1 << 32) - 2` is one limit: moved by one as a whole, its parts are not mutated
            skip.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "__name__":
            skip.update(id(n) for n in ast.walk(node))

    def add(node, new, what):
        out.append(Mutant(module, node.lineno, node.col_offset, node.end_lineno, node.end_col_offset,
                          ast.get_source_segment(source, node), new, what))

    def variant(node, change, what):
        copy = ast.parse(ast.get_source_segment(source, node).strip(), mode="eval").body if isinstance(node, ast.expr) else None
        if copy is None:
            return
        change(copy)
        add(node, "(" + ast.unparse(copy) + ")", what)

    for node in folded:
        v = _const_int(node)
        for new in (v - 1, v + 1):
            add(node, f"({new})", f"limit {v} -> {new}")
    for node in ast.walk(tree):
        if id(node) in skip or id(node) in docs:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMP:
                    def change(c, i=i, op=op):
                        c.ops[i] = _CMP[type(op)]()
                    variant(node, change, f"{type(op).__name__} -> {_CMP[type(op)].__name__}")
        elif isinstance(node, ast.BoolOp):
            def change(c):
                c.op = ast.Or() if isinstance(c.op, ast.And) else ast.And()
            variant(node, change, "and <-> or")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, "(" + ast.get_source_segment(source, node.operand) + ")", "drop `not`")
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN and not _is_text(node.left):
            def change(c):
                c.op = _BIN[type(c.op)]()
            variant(node, change, f"{type(node.op).__name__} -> {_BIN[type(node.op)].__name__}")
        elif isinstance(node, ast.Constant) and id(node) not in in_fstring:
            v = node.value
            if isinstance(v, bool):
                add(node, str(not v), "flip bool")
            elif isinstance(v, int):
                for new in sorted({v + 1, v - 1} if v else {1}):
                    add(node, str(new), f"int {v} -> {new}")
            elif isinstance(v, str) and id(node) in regex_args:
                for pattern, what in _regex_mutants(v):
                    add(node, "r" + repr(pattern) if "\\" not in pattern else repr(pattern), what)
            elif isinstance(v, str) and not re.search(r"\s", v):  # prose (messages, format strings) is not mutated
                add(node, repr("XX" + v + "XX"), "string")
        elif isinstance(node, ast.Raise):
            add(node, "pass", "drop raise")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            add(node, "pass", "drop call")
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            add(node, "return None", "return None")
        elif isinstance(node, ast.If) and not isinstance(node.test, (ast.Constant, ast.Compare, ast.BoolOp, ast.UnaryOp)):
            add(node.test, "(not (" + ast.get_source_segment(source, node.test) + "))", "negate if")
    out.sort(key=lambda m: (m.lineno, m.col, m.what, m.new))
    for n, m in enumerate(out, 1):
        m.id = f"{module}:{n}"
    return out


# -- running -----------------------------------------------------------------------------------------

def scratch_copy(isolate: str = "") -> Path:
    """The checkout's code and tests, outside the worktree (no .git, no caches); with `isolate`
    (a prefix), its tests name what they create with it instead of the rig's `mept-`."""
    path = Path(tempfile.mkdtemp(prefix="mep-mutate-"))
    for name in ("protocol", "privhelper", "broker", "localservice", "tests", "scripts", "systemd", "bench", "docs"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
    for name in ("pyproject.toml", "README.md", "SECURITY.md"):
        shutil.copyfile(ROOT / name, path / name)
    if isolate:
        for test in (path / "tests").rglob("*.py"):
            test.write_text(test.read_text().replace("mept-", isolate))
    os.chmod(path, 0o755)
    return path


class GlobalLock:
    """The project's test lock, held for a batch of root-tier runs at a time (at most `hold`
    seconds, then released so that the other engineers' runs get their turn)."""

    def __init__(self, hold: float, path: str = LOCK):
        self.hold, self.path, self.fd, self.since = hold, path, None, 0.0

    def ensure(self) -> None:
        if self.fd is not None and time.monotonic() - self.since > self.hold:
            self.release()
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            waited = time.monotonic()
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.since = time.monotonic()
            print(f"  (lock taken after {self.since - waited:.0f}s)", flush=True)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None
            time.sleep(1)  # let a waiting run take it


SERVER = r"""
import json, os, select, signal, sys, time
sys.path.insert(0, os.getcwd())
import pytest, tests.conftest  # noqa: F401 - pytest, hypothesis and every third-party module the tests import
here = os.getcwd()
for name, module in list(sys.modules.items()):  # forget our own code: each run imports the mutant from disk
    if (getattr(module, "__file__", None) or "").startswith(here + "/"):
        del sys.modules[name]
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        out = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1), os.dup2(out, 2)
        try:
            code = pytest.main(job["args"])
        except BaseException:
            code = 99
        os._exit(int(code))
    deadline, status = time.monotonic() + job["timeout"], None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
        elif time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.02)
    try:
        os.killpg(pid, signal.SIGKILL)  # anything the run left in its process group
    except ProcessLookupError:
        pass
    print(json.dumps({"status": status}), flush=True)
"""


class Runner:
    """Runs pytest in the scratch tree. A fork server: one process imports pytest and the
    third-party modules once, then forks a fresh child per run that imports our code from
    disk, i.e. the mutant (saves about a second of start-up per mutant)."""

    def __init__(self, tree: Path, deselect=()):
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("CI", None)
        self.tree, self.deselect = tree, [a for t in deselect for a in ("--deselect", t)]
        self.log = tree / "last-run.log"
        self.proc = subprocess.Popen(["nice", "-n", "10", PYTHON, "-c", SERVER], cwd=tree, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, tests: list, timeout: float, lock: GlobalLock | None = None) -> tuple:
        """(outcome, seconds, what failed): 'pass', 'fail' or 'timeout'; the last is the
        failing tests' summary lines (the run's whole output is in self.log). With `lock`,
        the run happens while it is held."""
        if not tests:
            return "pass", 0.0, ""
        if lock:
            lock.ensure()
        start = time.monotonic()
        args = ["-x", "-q", "-p", "no:cacheprovider", "--hypothesis-profile=mutation", *self.deselect, *tests]
        self.proc.stdin.write(json.dumps({"args": args, "timeout": timeout, "log": str(self.log)}) + "\n")
        self.proc.stdin.flush()
        status = json.loads(self.proc.stdout.readline())["status"]
        if status == "timeout" and lock:  # a hung helper may leave mept- users' processes: the rig's cleanup removes them
            subprocess.run([PYTHON, "-m", "tests.rigs.accounts", "cleanup"], cwd=self.tree, capture_output=True)
        outcome = "timeout" if status == "timeout" else "pass" if status == 0 else "fail"  # a broken collection is a kill too
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        failed = "; ".join(line[:200] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR ")))
        return outcome, time.monotonic() - start, failed

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def with_mutant(tree: Path, m: Mutant, run):
    path = tree / m.module
    original = path.read_text()
    path.write_text(m.apply(original))
    shutil.rmtree(path.parent / "__pycache__", ignore_errors=True)
    try:
        return run()
    finally:
        path.write_text(original)
        shutil.rmtree(path.parent / "__pycache__", ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Details: docs/mutation.md. "
                                     "Needs root (the fast tier's policy tests make root-owned files; the root tier makes "
                                     "mept- users through tests/rigs/accounts.py, under the global lock).")
    parser.add_argument("modules", nargs="*", help=f"files to mutate (default: all {len(ROOT_MODULES)} root modules)")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    parser.add_argument("--only", action="append", default=[], help="run only this mutant id (MODULE:N); repeatable")
    parser.add_argument("--no-root", action="store_true", help="fast tier only (no users, no lock)")
    parser.add_argument("--sample", type=int, default=1, help="run every Nth mutant only")
    parser.add_argument("--report", default=None, help="write the results as JSON here")
    parser.add_argument("--timeout-factor", type=float, default=4.0, help="a run this many times the baseline's length is a kill")
    parser.add_argument("--hold", type=float, default=240, help="seconds the global lock is held per batch of root runs")
    parser.add_argument("--isolate", nargs="?", const=ISOLATED_PREFIX, default="", metavar="PREFIX",
                        help=f"the root tier makes PREFIX users (default {ISOLATED_PREFIX}; 5 characters, as mept-) under "
                        "/tmp/mep-mutation-PREFIX.lock instead of mept- users under the global lock, so that a long run "
                        f"does not hold up other test runs (it still shares the CPU); deselects {', '.join(ISOLATED_DESELECT)}")
    parser.add_argument("--resume", action="store_true", help="take the results already in --report and run only "
                        "the mutants it has no result for (the report is rewritten after every mutant)")
    parser.add_argument("--fast-tests", default=None, help="comma-separated: the fast tier for every module, instead of TESTS")
    parser.add_argument("--root-tests", default=None, help="comma-separated: the root tier for every module, instead of TESTS "
                        "(a focused run over a few lines: --only ... --root-tests tests/test_x.py::test_y)")
    args = parser.parse_args(argv)
    global OVERRIDE
    if args.fast_tests is not None or args.root_tests is not None:
        OVERRIDE = tuple([t for t in (v or "").split(",") if t] for v in (args.fast_tests, args.root_tests))
    modules = args.modules or ROOT_MODULES
    mutants = [m for mod in modules for m in mutants_of(mod, (ROOT / mod).read_text())]
    if args.only:
        mutants = [m for m in mutants if m.id in args.only]
    mutants = mutants[::args.sample]
    if args.list:
        for m in mutants:
            print(m.describe())
        print(f"{len(mutants)} mutants")
        return 0
    tree = scratch_copy(args.isolate)
    if args.isolate and not re.fullmatch(r"[a-z]{4}-", args.isolate):
        parser.error("--isolate PREFIX: four lower-case letters and a dash, as the rig's mept-")
    lock = GlobalLock(args.hold, f"/tmp/mep-mutation-{args.isolate}lock" if args.isolate else LOCK)
    runner = Runner(tree, ISOLATED_DESELECT if args.isolate else ())
    status, by, baseline, failing = {}, {}, {}, {}
    others = []  # with --resume: the report's results for modules this run does not mutate, kept in it
    if args.resume and args.report and Path(args.report).exists():
        # matched by what the mutant is, not by its id: an edit elsewhere in a module renumbers
        # the ids, and a mutant whose code changed is a new one, run again
        ids = dict(zip(identities((m.module, m.what, m.old, m.new) for m in mutants), (m.id for m in mutants)))
        old = json.loads(Path(args.report).read_text())["results"]
        others = [r for r in old if r["id"].rsplit(":", 1)[0] not in modules]
        for key, r in zip(identities((r["id"].rsplit(":", 1)[0], r["what"], r["old"], r["new"]) for r in old), old):
            if r["status"] != "untested" and key in ids:
                status[ids[key]], by[ids[key]] = r["status"], r.get("tier") or r["by"]
                failing[ids[key]] = r.get("failed", "")
    print(f"scratch copy: {tree}; {len(mutants)} mutants, {sum(m.id in status for m in mutants)} done before", flush=True)

    def report() -> list:
        results = [{"id": m.id, "line": m.lineno, "what": m.what, "old": m.old, "new": m.new,
                    "status": status.get(m.id, "untested"), "by": by.get(m.id) if status.get(m.id) == "killed" else None,
                    "tier": by.get(m.id), "failed": failing.get(m.id, "")} for m in mutants]
        if args.report:
            Path(args.report).write_text(json.dumps({"modules": sorted({*modules, *(r["id"].rsplit(":", 1)[0] for r in others)}),
                                                     "sample": args.sample, "no_root": args.no_root,
                                                     "results": others + results}, indent=1))
        return results
    started = time.monotonic()
    try:
        for tier in ("fast", "root"):
            if tier == "root" and args.no_root:
                break
            done = (lambda m: m.id in status) if tier == "fast" else (
                lambda m: status.get(m.id) == "killed" or (by.get(m.id) or "").startswith("root"))
            todo = [m for m in mutants if not done(m) and tests_for(m.module)[tier == "root"]]
            for tests in dict.fromkeys(tuple(tests_for(m.module)[tier == "root"]) for m in todo):
                for attempt in (1, 2):  # once more: a timing test can fail once on a loaded machine
                    outcome, secs, failed = runner.run(list(tests), 1800, lock if tier == "root" else None)
                    if outcome == "pass":
                        break
                    print(f"baseline {tier} {' '.join(tests)} does not pass ({outcome}, attempt {attempt}): {failed}",
                          file=sys.stderr, flush=True)
                    shutil.copyfile(runner.log, f"/tmp/mutate-baseline-{attempt}.log")
                if outcome != "pass":
                    print("fix the tests first (the runs' output: /tmp/mutate-baseline-*.log)", file=sys.stderr)
                    return 1
                baseline[tests] = secs
                print(f"baseline {tier} {' '.join(tests)}: {secs:.1f}s", flush=True)
            for m in todo:
                tests = tests_for(m.module)[tier == "root"]
                outcome, secs, failed = with_mutant(tree, m, lambda: runner.run(
                    tests, 30 + args.timeout_factor * baseline[tuple(tests)], lock if tier == "root" else None))
                status[m.id] = "killed" if outcome != "pass" else "survived"
                by[m.id] = f"{tier}{' timeout' if outcome == 'timeout' else ''}"
                failing[m.id] = failed
                print(f"{status[m.id]:8} {tier:4} {secs:5.1f}s {m.describe()}", flush=True)
                report()
            lock.release()
    finally:
        lock.release()
        runner.close()
        shutil.rmtree(tree, ignore_errors=True)
    results = report()
    print(f"\n{summary(results)} in {(time.monotonic() - started) / 60:.0f} min")
    for r in results:
        if r["status"] != "killed":
            print(f"  {r['status'].upper()} {r['id']} line {r['line']}: {r['what']}: {r['old'][:80]!r} -> {r['new'][:80]!r}")
    return 0


def identities(keys) -> list:
    """Each key with its occurrence number, so that two identical edits in one module stay two."""
    seen = {}
    out = []
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
        out.append((*key, seen[key]))
    return out


def summary(results) -> str:
    lines = []
    for mod in dict.fromkeys(r["id"].rsplit(":", 1)[0] for r in results):
        rs = [r for r in results if r["id"].startswith(mod + ":")]
        k, t = sum(r["status"] == "killed" for r in rs), sum(r["status"] != "untested" for r in rs)
        lines.append(f"  {mod:28} {k:4} of {t:4} killed" + (f", {len(rs) - t} untested" if len(rs) > t else ""))
    k, t = sum(r["status"] == "killed" for r in results), sum(r["status"] != "untested" for r in results)
    return "\n".join(lines) + f"\n{k} of {t} tested mutants killed ({100 * k / max(t, 1):.1f}%), {t - k} survived, " \
        f"{len(results) - t} untested"


if __name__ == "__main__":
    sys.exit(main())
