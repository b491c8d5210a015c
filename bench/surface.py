"""Root surface: the code that runs as root, measured from what each process really loads.

Ours: the helper as it runs (`python3 -I -S`, its own code only) after importing every
module of protocol/ and privhelper/: every module in sys.modules and the non-blank lines of their files, split
into the project's root part (protocol/, privhelper/) and the standard library.
Upstream's all-root MEP: the same for `globus_compute_endpoint.cli` and what its MEP
imports, in the pinned UEP venv (globus-compute-endpoint, -sdk, -common and every
dependency loaded in that process).
"""

from __future__ import annotations

import json
import pathlib
import subprocess

from bench import fixture

UEP_PYTHON = "/opt/mep/uep-venv/bin/python3"
PROBE = """
import json, sys
{imports}
files = {{}}
for name, module in sorted(sys.modules.items()):
    path = getattr(module, "__file__", None)
    if path and path.endswith(".py"):
        files[name] = path
print(json.dumps(files))
"""


def loaded(argv: list, imports: str) -> dict:
    out = subprocess.run([*argv, PROBE.format(imports=imports)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def lines(path: str) -> int:
    return sum(1 for line in pathlib.Path(path).read_text(errors="replace").splitlines() if line.strip())


def summarize(files: dict, own: tuple) -> dict:
    by_kind = {"own": [0, 0], "stdlib": [0, 0], "third-party": [0, 0]}
    for name, path in files.items():
        kind = ("own" if name.split(".")[0] in own else "third-party" if "-packages" in path else "stdlib")
        by_kind[kind][0] += 1
        by_kind[kind][1] += lines(path)
    return {k: {"modules": m, "lines": n} for k, (m, n) in by_kind.items()} | {
        "total": {"modules": len(files), "lines": sum(n for _, n in by_kind.values())}}


def measure(say=print) -> dict:
    say("root surface: the helper's import closure")
    code_dir = fixture.helper_code_dir()
    every = "\n".join(f"import {pkg}.{p.stem}" for pkg in ("protocol", "privhelper")
                      for p in sorted((pathlib.Path(code_dir) / pkg).glob("*.py")) if p.stem != "__init__")
    ours = loaded([fixture.PYTHON, "-I", "-S", "-c"], f"sys.path.insert(0, {code_dir!r})\n{every}")
    say("root surface: upstream's MEP (globus_compute_endpoint.cli and its multi-user path)")
    upstream = loaded([UEP_PYTHON, "-I", "-c"], "sys.argv = ['/opt/mep/uep-venv/bin/globus-compute-endpoint']\n"
                      "import globus_compute_endpoint.cli\n"
                      "import globus_compute_endpoint.endpoint.core_endpoint\n"
                      "import globus_compute_endpoint.endpoint.identity_mapper")
    project = sum(lines(p) for d in ("protocol", "privhelper")
                  for p in (pathlib.Path(code_dir) / d).glob("*.py"))
    return {"ours": summarize(ours, ("protocol", "privhelper")) | {"root_part_lines": project},
            "upstream": summarize(upstream, ("globus_compute_endpoint", "globus_compute_sdk",
                                             "globus_compute_common"))}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
