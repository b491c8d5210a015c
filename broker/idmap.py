"""Globus identity set -> local username, with globus-identity-mapping, hot-reloaded.

Mappers run in file order and, inside a mapper, rule by rule; the first rule that maps
any identity of the set wins (upstream's order). A reload swaps the whole mapper list at
once; a file that is missing, unreadable or invalid leaves the old list in place, and
both outcomes are logged.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib

import attrs
from globus_identity_mapping.loader import load_mappers

# the connector id upstream passes for POSIX (Globus Connect Server's identity mapping guide)
POSIX_CONNECTOR_ID = "145812c8-decc-41f1-83cf-bb2a85a2a70b"


class MappingConfigError(Exception):
    """The identity mapping file cannot be used; the message names the file and why."""


@attrs.frozen
class Mapped:
    username: str
    identity: str  # the Globus identity id that matched
    rule: str  # which mapper and rule, for the admin: "mapper 1 (expression_identity_mapping#1.0.0) rule 2"
    candidates: list  # upstream's globus_candidate_identities: per mapper, [{identity id: [usernames]}]


def load(path: pathlib.Path, endpoint_id: str) -> list:
    try:
        text = path.read_text()
    except OSError as e:
        raise MappingConfigError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        documents = json.loads(text)
    except json.JSONDecodeError as e:
        raise MappingConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(documents, list) or not documents:
        raise MappingConfigError(f"{path}: must hold a non-empty JSON list of mapping documents "
                                 '(each with a "DATA_TYPE", e.g. "expression_identity_mapping#1.0.0")')
    try:
        mappers = load_mappers(documents, POSIX_CONNECTOR_ID, endpoint_id)
    except Exception as e:  # the library raises several types for bad documents
        raise MappingConfigError(f"{path}: invalid mapping document: ({type(e).__name__}) {e}") from None
    if len(mappers) != len(documents):
        kinds = [d.get("DATA_TYPE") if isinstance(d, dict) else d for d in documents]
        raise MappingConfigError(f"{path}: unknown DATA_TYPE among {kinds} (known: expression_identity_mapping#1.0.0, "
                                 "external_identity_mapping#1.0.0)")
    return [(str(d.get("DATA_TYPE")), m) for d, m in zip(documents, mappers)]


def map_identity_set(mappers: list, identity_set: list, warn=None) -> Mapped | None:
    """The first mapping, in upstream's order; None if nothing maps. A mapper that fails
    (an external program that exits non-zero, such as the seed's /bin/false example) is
    skipped with a warning naming it, and the next one is tried, as upstream does."""
    candidates, found = [], None
    for m_index, (kind, mapper) in enumerate(mappers, start=1):
        try:
            per_rule = mapper.map_identities(identity_set)  # one dict per rule: {identity id: [usernames]}
        except Exception as e:  # noqa: BLE001 - the library's and the program's own errors alike
            if warn is not None:
                warn("identity mapper failed; trying the next one", mapper=f"mapper {m_index} of {len(mappers)} ({kind})",
                     error=f"({type(e).__name__}) {e}")
            candidates.append([])
            continue
        candidates.append([r for r in per_rule if r])
        for r_index, result in enumerate(per_rule, start=1):
            for identity, usernames in result.items():
                if found is None and usernames:
                    found = (usernames[0], identity, f"mapper {m_index} ({kind}) rule {r_index}")
    return Mapped(*found, candidates) if found else None


class IdentityMapper:
    """The live mapping: `map()` uses the current mappers; `watch()` reloads on change."""

    def __init__(self, path: pathlib.Path, endpoint_id: str, log):
        self.path, self.endpoint_id, self.log = path, endpoint_id, log
        self._stamp = self._stat()
        self.mappers = load(path, endpoint_id)  # at start, an invalid file is fatal

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError as e:
            return ("missing", e.strerror)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)

    def map(self, identity_set: list) -> Mapped | None:
        return map_identity_set(self.mappers, identity_set, warn=self.log.warning)

    def reload_if_changed(self) -> bool:
        """Reload when the file changed; True if a new mapping is now in use."""
        if (stamp := self._stat()) == self._stamp:
            return False
        self._stamp = stamp
        if stamp[0] == "missing":
            self.log.error("identity mapping file is gone; keeping the previous mapping", path=str(self.path),
                           error=stamp[1])
            return False
        try:
            mappers = load(self.path, self.endpoint_id)
        except MappingConfigError as e:
            self.log.error("identity mapping file changed but is invalid; keeping the previous mapping", error=str(e))
            return False
        self.mappers = mappers
        self.log.info("identity mapping reloaded", path=str(self.path), mappers=[k for k, _ in mappers])
        return True

    async def watch(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()
