"""The socket helpers of each side (ps/transport.py, worker/transport.py) and the table's restore API.

Both sides make their DEALERs the same way (linger 0, the named high-water
marks), receive one whole message at a time and drain with a named bound;
they are twins because ps/ and worker/ never import each other, so they are
tested as twins. Loopback only; every receive is a poll with a timeout.
"""
from __future__ import annotations

import numpy as np
import pytest
import zmq

from protocol.messages import SliceData
from protocol.plan import make_plan
from ps import checkpoint
from ps import transport as ps_transport
from ps.optim import make_optimizer
from ps.policy import make_policy
from ps.table import JobTable
from worker import transport as worker_transport

SIDES = pytest.mark.parametrize("side", [ps_transport, worker_transport], ids=["ps", "worker"])
WAIT_MS = 10_000



def test_both_sides_agree_on_their_bounds():
    for name in ("SEND_HWM_MSGS", "RECV_HWM_MSGS", "HEARTBEAT_SEND_HWM_MSGS", "MAX_DRAIN_MSGS"):
        assert getattr(ps_transport, name) == getattr(worker_transport, name), name


@SIDES
def test_a_dealer_has_linger_0_and_the_named_high_water_marks(side, ctx, router):
    _, addr = router
    sock = side.connect_dealer(ctx, addr)
    beat = side.connect_dealer(ctx, addr, send_hwm=side.HEARTBEAT_SEND_HWM_MSGS)
    try:
        assert sock.type == zmq.DEALER
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.SNDHWM) == side.SEND_HWM_MSGS
        assert sock.getsockopt(zmq.RCVHWM) == side.RECV_HWM_MSGS
        assert beat.getsockopt(zmq.SNDHWM) == side.HEARTBEAT_SEND_HWM_MSGS
    finally:
        sock.close(0)
        beat.close(0)


@SIDES
def test_an_unusable_address_raises_and_leaves_no_socket(side, ctx):
    with pytest.raises(zmq.ZMQError):
        side.connect_dealer(ctx, "tcp://no-port-here")


@SIDES
def test_one_whole_message_at_a_time_and_a_bounded_drain(side, ctx):
    # inproc: a message is in the receiver's pipe once send returns, so all five wait at once.
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.bind(f"inproc://drain-{side.__name__}")
    sock = side.connect_dealer(ctx, f"inproc://drain-{side.__name__}")
    try:
        with pytest.raises(zmq.Again):
            side.recv_message(sock)
        for i in range(5):
            peer.send_multipart([b"head", str(i).encode(), b"tail"])
        assert sock.poll(WAIT_MS)
        got: list = []
        assert side.drain(sock, lambda frames: got.append([bytes(f) for f in frames]), limit=3) == 3
        assert side.drain(sock, lambda frames: got.append([bytes(f) for f in frames])) == 2
        assert got == [[b"head", str(i).encode(), b"tail"] for i in range(5)]
        assert side.drain(sock, got.append) == 0
        assert side.send_nowait(sock, [b"back", b"again"])
        assert peer.poll(WAIT_MS) and peer.recv_multipart() == [b"back", b"again"]
    finally:
        sock.close(0)
        peer.close(0)


@SIDES
def test_send_nowait_says_when_the_queue_is_full(side, ctx):
    # Nothing listens there: messages queue on the socket up to its high-water mark, then are refused.
    sock = side.connect_dealer(ctx, "tcp://127.0.0.1:9", send_hwm=2)
    try:
        results = [side.send_nowait(sock, [b"beat"]) for _ in range(100)]
        assert results[0] is True and results[-1] is False
    finally:
        sock.close(0)


def test_the_worker_side_sends_large_frames_without_a_copy(ctx, router):
    rsock, addr = router
    sock = worker_transport.connect_dealer(ctx, addr)
    big = np.arange(100_000, dtype=np.float32)
    try:
        worker_transport.send_message(sock, [b"head", memoryview(big)])
        assert rsock.poll(WAIT_MS)
        frames = rsock.recv_multipart()
        assert frames[1] == b"head" and np.array_equal(np.frombuffer(frames[2], np.float32), big)
    finally:
        sock.close(0)


# --- the table's restore API ------------------------------------------------------------------


def adam_table(values: float = 1.0) -> JobTable:
    plan = make_plan({"w": ((8, 4), "float32"), "mean": ((4,), "float32")}, 1, 1 << 20)
    initial = {s.sid: np.full(s.count, values, np.float32) for s in plan.slices}
    return JobTable("j", plan, 0, make_optimizer({"kind": "adam", "lr": 0.1}), make_policy({"policy": "asp"}),
                    nonlearned=["mean"], initial=initial)


def test_a_checkpoints_optimizer_state_goes_back_through_load_state(tmp_path):
    table = adam_table()
    for step in range(3):
        table.apply([SliceData(sid, np.full(s.count, 0.5 + step, np.float32)) for sid, s in table.held.items()],
                    step=step)
    path = checkpoint.save(tmp_path, table)
    _meta, values, state = checkpoint.read(path)
    restored = adam_table()
    restored.load_state(state)
    assert set(restored.opt_state) == restored.learned == table.learned
    for sid, keys in table.opt_state.items():
        for key, arr in keys.items():
            assert np.array_equal(restored.opt_state[sid][key], arr), (sid, key)


@pytest.mark.parametrize("break_it, words", [
    (lambda st, sid: st.update({999: {}}), "slice 999"),
    (lambda st, sid: st[sid].pop("t"), "keys"),
    (lambda st, sid: st[sid].update(extra=np.zeros(1)), "keys"),
    (lambda st, sid: st[sid].update(m=np.zeros(3, np.float32)), "shape"),
], ids=["unknown slice", "missing key", "extra key", "wrong shape"])
def test_load_state_refuses_a_state_that_does_not_fit_and_changes_nothing(break_it, words):
    table = adam_table()
    sid = next(iter(table.learned))
    state = {s: {k: np.full_like(v, 7) for k, v in keys.items()} for s, keys in table.opt_state.items()}
    break_it(state, sid)
    with pytest.raises(ValueError, match=words):
        table.load_state(state)
    assert all(not np.any(arr) for keys in table.opt_state.values() for arr in keys.values())
