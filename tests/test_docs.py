"""SECURITY.md names a test for every claim; each name it gives must exist, or the
document would promise a check that nobody runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF = re.compile(r"`((?:tests/)?(?:faults/)?test_[a-z_]+\.py)?::(test_[a-z0-9_]+)`|`((?:tests/)?(?:faults/)?test_[a-z_]+\.py)`")


def test_every_test_security_md_names_exists():
    text, current, named, missing = (ROOT / "SECURITY.md").read_text(), None, 0, []
    for m in REF.finditer(text):
        current = m.group(1) or m.group(3) or current  # `::name` continues the last file named
        if not m.group(2):
            continue
        named += 1
        files = list((ROOT / "tests").rglob(Path(current).name))
        if not any(re.search(rf"^def {m.group(2)}\(", f.read_text(), re.M) for f in files):
            missing.append(f"{current}::{m.group(2)}")
    assert named > 60, named  # the pattern still finds the document's references
    assert not missing, missing
