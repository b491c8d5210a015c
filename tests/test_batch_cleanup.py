"""broker/batch_cleanup.py's bookkeeping, pure logic (the real path, helper, user and
scancel, is tests/test_slurm_e2e.py): which UEPs get a cleanup, what the spawn asks for,
and an exit that arrives before its spawn's answer was handled."""

import asyncio
import json
import types

import pytest

from broker import batch_cleanup
from broker.batch_cleanup import CLEANUP_ENV, BatchCleanup
from broker.helper_client import SpawnResult


class Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


class Helper:
    """Answers each spawn with a new pid; with `exit_first`, that pid's exit event is
    delivered before the spawn's answer wakes the caller (both frames in one read)."""

    def __init__(self, exit_first=False):
        self.spawns, self.exit_first, self.on_exit, self.next_pid = [], exit_first, None, 5000
        self.closed = asyncio.get_running_loop().create_future()

    async def spawn(self, username, uid, name, env, stdin, channels):
        self.spawns.append((username, uid, name, env, stdin, channels))
        self.next_pid += 1
        pid, answer = self.next_pid, asyncio.get_running_loop().create_future()
        answer.set_result(SpawnResult(pid, {}))
        if self.exit_first:
            self.on_exit(pid, 0)
        return await answer


def uep(pid=4242, name="ep-1"):
    return types.SimpleNamespace(pid=pid, name=name, username="jess", uid=1234)


SLURM = {"engine": {"type": "GlobusComputeEngine", "provider": {"type": "SlurmProvider", "partition": "debug"}}}


@pytest.mark.parametrize("config, kind", [
    (SLURM, "SlurmProvider"),
    ({"engine": {"type": "GlobusComputeEngine", "provider": {"type": "LocalProvider"}}}, None),
    ({"engine": {"type": "GlobusComputeEngine", "provider": {"type": "PBSProProvider"}}}, None),
    ({"engine": {"type": "ThreadPoolEngine"}}, None), ({}, None), ({"engine": "x"}, None),
    ({"engine": {"provider": "SlurmProvider"}}, None)])
def test_only_a_slurm_provider_gets_a_cleanup(config, kind):
    assert batch_cleanup.batch_provider(config) == kind


@pytest.mark.parametrize("exit_first", [False, True], ids=["answer-first", "exit-first"])
def test_a_slurm_uep_that_exits_gets_one_cleanup_as_its_user(exit_first):
    async def main():
        helper, log = Helper(exit_first), Log()
        batch = BatchCleanup(helper, log, lambda: {"SLURM_CONF": "/x/slurm.conf"})
        helper.on_exit = lambda pid, status: batch.on_exit(pid, status) or log.lines.append(("warning", "unknown", {}))
        local, slurm = uep(pid=7, name="local"), uep()
        batch.watch(slurm, SLURM)
        batch.watch(local, {"engine": {"type": "ThreadPoolEngine"}})
        batch.uep_exited(local)  # no provider: nothing to cancel
        batch.uep_exited(slurm)
        await asyncio.sleep(0)
        if not exit_first:
            await asyncio.sleep(0)
            assert batch.on_exit(5001, 0)
        await asyncio.wait_for(batch._idle.wait(), 5)
        return helper, log, batch
    helper, log, batch = asyncio.run(main())
    assert helper.spawns == [("jess", 1234, "ep-1", {"SLURM_CONF": "/x/slurm.conf", CLEANUP_ENV: "4242"}, b"", ())]
    events = [event for _, event, _ in log.lines]
    assert events == ["batch job cleanup started", "batch jobs of the user endpoint cancelled"]
    assert batch.running == {} and batch._early == {}


def test_the_batch_mark_survives_a_broker_re_exec():
    """broker/reexec.py carries each UEP as UEP.export() -> UEP.resume(): a UEP started
    before a SIGHUP still gets its cleanup after it."""
    from broker.commands import StartCommand
    from broker.registry import UEP
    before = UEP(name="ep-1", username="jess", uid=1234, pid=4242, endpoint_id="e", identity="i", enckey=b"k" * 44,
                 cred_fd=None)
    BatchCleanup(None, Log(), dict).watch(before, SLURM)
    after = UEP.resume(json.loads(json.dumps(before.export())), StartCommand)
    assert after.batch == before.batch == "SlurmProvider"


def test_an_unknown_exit_is_not_taken_for_a_cleanup():
    async def main():
        batch = BatchCleanup(Helper(), Log(), dict)
        return batch.on_exit(999, 0)
    assert asyncio.run(main()) is False
