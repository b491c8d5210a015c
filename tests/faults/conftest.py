"""Fixtures of the fault tests."""

from __future__ import annotations

import os

import pytest

from tests.rigs.accounts import PAM_DIR, pam_service


@pytest.fixture
def pam(rigdir):
    """A PAM service whose account step takes 3 s for mept-bob (and marks that it began;
    while a `hold` file exists it waits instead until a `release` file appears), and
    whose session step logs open and close."""
    tag = os.urandom(3).hex()
    log, marker = rigdir.path / f"pam-{tag}.log", rigdir.path / f"pam-{tag}.slow"
    hold, release = rigdir.path / f"pam-{tag}.hold", rigdir.path / f"pam-{tag}.release"
    hook = rigdir.file(f"pam-{tag}-hook.sh", f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER" >> {log}\n', mode=0o755)
    slow = rigdir.file(f"pam-{tag}-slow.sh", f'#!/bin/sh\n[ "$PAM_USER" = mept-bob ] || exit 0\n'
                       f'echo "$PAM_USER" >> {marker}\n[ -e {hold} ] || exec sleep 3\n'
                       f'for i in $(seq 600); do [ -e {release} ] && exit 0; sleep 0.1; done\n', mode=0o755)
    service = pam_service(f"faults-{tag}", f"auth required pam_permit.so\naccount required pam_exec.so {slow}\n"
                              f"account required pam_unix.so\nsession required pam_exec.so {hook}\n")
    yield {"service": service, "log": log, "marker": marker, "hold": hold, "release": release, "policy": {"pam": {"enabled": True, "service": service}}}
    (PAM_DIR / service).unlink(missing_ok=True)
