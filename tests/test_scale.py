"""Issue 20: a thousand live UEPs on one MEP (the real helper --launch and broker, RabbitMQ,
the static probe as the UEP program, the bench's 50 users; the test's policy raises
max_children to 1,024, the defaults stay). How fast each step is, is bench/thousand.py's
figure (docs/performance.md); this asserts what must hold at that size: every UEP starts and
is listed, a hot restart keeps every one, and a stop ends every one by its TERM, within the
grace period (none needs the KILL that follows it), leaving none, and every user hears of
the stop: N notices, each its own AMQP connection with that UEP's credentials, sent a few at
a time (all at once, they were N connections at once, past a default RabbitMQ's 1,024 file
descriptors: notices failed and its memory monitor died)."""

import pytest

from bench import fixture, thousand

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("rabbitmq")]

N = 1000


def test_a_thousand_live_ueps_are_listed_kept_by_a_hot_restart_and_ended_by_a_stop():
    with fixture.Fixture(users=50) as fx:
        out = thousand.measure(fx, N, say=lambda *_: None)
    assert out["session_processes"] == N  # one root session process per live UEP, all started
    assert out["list_complete"] and out["status_complete"]  # `mepctl list` names all N, `status` counts N
    assert out["after_hup"] == {"same_session_processes": True, "broker_pid_kept": True, "listed": N}
    assert out["probes_left_after_stop"] == 0
    assert out["exits_after_stop"] == {-15: N}, "every UEP ended by the stop's TERM, none by a KILL after the grace"
    assert out["stop_notices"] == {"sent": N, "not sent": 0}  # each user told, N connections, never N at once
