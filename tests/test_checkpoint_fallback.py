"""Checkpoints a job can trust, with real processes on loopback.

- A server killed with kill -9 whose newest checkpoint comes back damaged
  restarts from the one before it, says in its log which file it skipped
  and why, and the job still succeeds.
- A job whose every checkpoint is bad is not restored, and the log says so.
- `checkpoint` is answered once the file is on disk; `restore` rolls a
  table back to a checkpoint (values, optimizer state, clocks), refuses
  the pulls parked on the history it leaves, and refuses a bad version
  with the reason.
- The registration tells the scheduler what was restored, and heartbeats
  list the valid checkpoint versions (a fake scheduler socket listens).
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from protocol.codec import decode, encode
from protocol.messages import Checkpoint, Error, Heartbeat, Membership, Ok, Pull, Register, Restore, Stats
from protocol.plan import make_plan
from ps import checkpoint
from ps.transport import split_envelope
from tests.test_checkpoint_files import nan_value, table, truncate, write
from tests.test_jobs import job_file, psctl_json, status, wait_until
from worker.client import ParamClient

WAIT_MS = 10_000
HEARTBEAT_TIMEOUT = "2"
STEPS = 400
CHECKPOINT_EVERY = 40


def request(sock: zmq.Socket, msg):
    sock.send_multipart(encode(msg))
    return receive(sock)


def receive(sock: zmq.Socket):
    assert sock.poll(WAIT_MS), "no answer within 10 s"
    return decode(sock.recv_multipart())


def full_log(proc) -> str:
    """The whole stderr of a process (Proc.stderr() keeps only its tail)."""
    return Path(proc.stderr_file.name).read_text(errors="replace")


def skipped_lines(proc) -> list[str]:
    return [line for line in full_log(proc).splitlines() if "msg=\"checkpoint skipped\"" in line]


# --- kill -9, a damaged newest file, and the job goes on -------------------------------------------


@pytest.mark.parametrize("damage, words", [(truncate, "unreadable"), (nan_value, "not finite")],
                         ids=["truncated", "nan"])
def test_a_restarted_server_falls_back_past_a_damaged_checkpoint_and_the_job_succeeds(procs, tmp_path,
                                                                                        damage, words):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
    addr = sched.ready["addr"]
    ckpt = tmp_path / "ckpt"
    first = procs.server(0, "--scheduler", addr, "--checkpoint-dir", str(ckpt))
    procs.start("worker", "--scheduler", addr, "--slowdown", "10")
    spec = job_file(tmp_path, workers=1, steps=STEPS, target_accuracy=None, checkpoint_every=CHECKPOINT_EVERY,
                    consistency={"policy": "bsp"})
    job = psctl_json("submit", spec, "--scheduler", addr)["job"]
    directory = checkpoint.job_dir(ckpt, job, 0)

    def two_on_disk_and_one_known() -> bool:
        # A scheduler that keeps the job's complete checkpoints (heard in heartbeats) rolls back
        # only to one of them: it must know one still on disk besides the newest, the one to be
        # damaged. Asked first, the files listed last: the kill follows the listing at once.
        known = status(addr, job).get("checkpoints")
        have = checkpoint.versions(directory)
        return len(have) >= 2 and (known is None or any(c["version"] in have[:-1] for c in known))

    wait_until(two_on_disk_and_one_known, what="two checkpoints on disk, an older one known to the scheduler")
    first.signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert status(addr, job)["state"] == "running", "the job ended before the kill: nothing was tested"
    *_, older, newest = checkpoint.versions(directory)
    damage(checkpoint.path_of(directory, newest), tmp_path)
    second = procs.server(0, "--scheduler", addr, "--checkpoint-dir", str(ckpt))
    [line] = skipped_lines(second)
    assert f"path={checkpoint.path_of(directory, newest)}" in line and words in line, line
    assert f"msg=restored job={job} version={older} " in full_log(second)
    wait_until(lambda: status(addr, job)["state"] != "running", what="the job ended after the restart")
    final = status(addr, job)
    assert final["state"] == "succeeded", final["result"]
    assert final["result"]["steps_done"] == STEPS


def test_a_job_whose_every_checkpoint_is_bad_is_not_restored(procs, tmp_path, dealer):
    t = table(steps=4)
    path = write(tmp_path, t)
    truncate(path, tmp_path)
    server = procs.server(0, "--checkpoint-dir", str(tmp_path))
    log = full_log(server)
    assert "checkpoint skipped" in log and "unreadable" in log
    assert f"msg=\"job not restored: none of its checkpoints passed the checks\" job={t.job}" in log
    reply = request(dealer(server.ready["addr"]), Stats(rid=1))
    assert isinstance(reply, Ok) and reply.body["jobs"] == {}


# --- the `checkpoint` and `restore` ops ---------------------------------------------------------------


def test_checkpoint_answers_once_durable_and_restore_rolls_the_table_back(procs, tmp_path, dealer):
    ckpt = tmp_path / "ckpt"
    server = procs.server(0, "--checkpoint-dir", str(ckpt))
    addr = server.ready["addr"]
    plan = make_plan({"w": ((1000,), "float32")}, 1, 1 << 20)
    ones = {"w": np.ones(1000, np.float32)}
    control = dealer(addr)
    with ParamClient([addr], plan, job="rb", worker="a", timeout_s=10) as a, \
            ParamClient([addr], plan, job="rb", worker="b", timeout_s=10) as b:
        a.create({"w": np.zeros(1000, np.float32)}, optimizer={"kind": "momentum", "lr": 0.5, "momentum": 0.9},
                 policy={"policy": "bsp"})
        # both members from step 0 (in open mode a barrier would close on whoever pushed first)
        assert isinstance(request(control, Membership(rid=9, job="rb", epoch=1, workers={"a": -1, "b": -1})), Ok)
        for step in range(2):
            a.push(ones, clock=step)
            b.push(ones, clock=step)
        reply = request(control, Checkpoint(rid=1, job="rb"))
        assert isinstance(reply, Ok), reply
        # acknowledged means on disk: no waiting, no polling
        assert Path(reply.body["written"]["rb"]) == checkpoint.path_of(checkpoint.job_dir(ckpt, "rb", 0), 2)
        assert checkpoint.versions(checkpoint.job_dir(ckpt, "rb", 0)) == [2]
        for step in (2, 3):  # two more steps: the velocity moves on too
            a.push({"w": np.full(1000, 3.0, np.float32)}, clock=step)
            b.push({"w": np.full(1000, 3.0, np.float32)}, clock=step)
        a.push(ones, clock=4)   # half of step 4's barrier
        parked = dealer(addr)
        parked.send_multipart(encode(Pull(rid=7, job="rb", worker="a", clock=5)))
        wait_until(lambda: a.stats()[0]["parked"] == 1, timeout=10, what="a pull parked")

        reply = request(control, Restore(rid=2, job="rb", version=2))
        assert isinstance(reply, Ok), reply
        assert reply.body == {"job": "rb", "version": 2, "clocks": {"a": 2, "b": 2}}
        refused = receive(parked)
        assert isinstance(refused, Error) and refused.code == "reassigned" and "rolled back to version 2" in \
            refused.message
        table_now = a.stats()[0]["jobs"]["rb"]
        assert table_now["version"] == 2 and table_now["clocks"] == {"a": 2, "b": 2} and table_now["parked"] == 0
        first_pass = a.pull()["w"].copy()
        np.testing.assert_array_equal(first_pass, momentum_steps([1.0, 1.0], lr=0.5, mu=0.9))
    # Steps 2 and 3 again give the same bits as from scratch: the values and the velocity were restored.
    with ParamClient([addr], plan, job="rb", worker="a", timeout_s=10) as a, \
            ParamClient([addr], plan, job="rb", worker="b", timeout_s=10) as b:
        for step in (2, 3):
            a.push({"w": np.full(1000, 3.0, np.float32)}, clock=step)
            b.push({"w": np.full(1000, 3.0, np.float32)}, clock=step)
        replayed = a.pull()["w"]
    reference = momentum_steps([1.0, 1.0, 3.0, 3.0], lr=0.5, mu=0.9)
    np.testing.assert_array_equal(replayed, reference)

    for msg, code, words in [
        (Restore(rid=3, job="rb", version=99), "bad_state", "no complete checkpoint of version 99"),
        (Restore(rid=4, job="rb", version=-1), "bad_field", "version"),
        (Restore(rid=5, job="nojob", version=2), "unknown_job", "nojob"),
    ]:
        reply = request(control, msg)
        assert isinstance(reply, Error) and reply.code == code and words in reply.message, reply
    truncate(checkpoint.path_of(checkpoint.job_dir(ckpt, "rb", 0), 2), tmp_path)
    reply = request(control, Restore(rid=6, job="rb", version=2))
    assert isinstance(reply, Error) and reply.code == "bad_state" and "unreadable" in reply.message, reply


def momentum_steps(grads: list[float], *, lr: float, mu: float) -> np.ndarray:
    """What the shard's momentum rule gives from zeros for these gradients (float32, as it computes)."""
    p = np.zeros(1000, np.float32)
    v = np.zeros(1000, np.float32)
    for g in grads:
        v = v * np.float32(mu) + np.float32(g)
        p = p + v * np.float32(-lr)
    return p


# --- what the scheduler is told --------------------------------------------------------------------


def test_registration_says_what_was_restored_and_heartbeats_list_the_valid_versions(procs, tmp_path, router):
    sock, sched_addr = router
    directory = checkpoint.job_dir(tmp_path / "ckpt", "ck-job", 0)
    directory.mkdir(parents=True)
    for version in (2, 4, 6, 8):  # each written alone (a write deletes the newer ones), then put together
        path = write(tmp_path / f"v{version}", table(steps=version))
        shutil.copyfile(path, directory / path.name)
    truncate(checkpoint.path_of(directory, 8), tmp_path)   # the newest: skipped at start
    nan_value(checkpoint.path_of(directory, 2), tmp_path)  # the oldest: fails its check in the background
    server = procs.start("server", "--bind", "tcp://127.0.0.1:0", "--shard-id", "0", "--scheduler", sched_addr,
                         "--checkpoint-dir", str(tmp_path / "ckpt"), ready=False)
    envelope, register = next_message(sock, Register)
    assert register.info["restored"] == {"ck-job": 6} and register.info["jobs"] == ["ck-job"]
    sock.send_multipart(envelope + encode(Ok(rid=register.rid, body={"heartbeat_interval_s": 0.05, "shard": 0})))
    server.wait_ready()
    seen = []
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline and (not seen or seen[-1] != {"ck-job": [4, 6]}):
        seen.append(next_message(sock, Heartbeat)[1].state["checkpoints"])
    # 6 (restored) from the first beat on; 4 once it was checked; 2 and 8 never
    assert seen[-1] == {"ck-job": [4, 6]} and all(c in ({"ck-job": [6]}, {"ck-job": [4, 6]}) for c in seen), seen
    lines = skipped_lines(server)
    assert len(lines) == 2, lines
    assert "ckpt-000000000008.npz" in lines[0] and "unreadable" in lines[0]
    assert "version=2" in lines[1] and "not finite" in lines[1]


def next_message(sock: zmq.Socket, kind) -> tuple[list, object]:
    """The next message of `kind` from the shard (others skipped), with its envelope."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        assert sock.poll(WAIT_MS), f"no {kind.__name__} within 10 s"
        envelope, frames = split_envelope(sock.recv_multipart())
        msg = decode(frames)
        if isinstance(msg, kind):
            return envelope, msg
    raise AssertionError(f"no {kind.__name__} within 10 s")


# --- the benchmark's smoke test: it runs and reports, no timing claims ------------------------------


def test_bench_checkpoint_runs_small_and_reports_both_sides():
    import json

    from click.testing import CliRunner

    from worker.cli.cmd_bench_checkpoint import checkpoint as bench_checkpoint

    result = CliRunner().invoke(bench_checkpoint, ["--params", "20k", "--every", "2", "--steps", "4", "--rounds", "1",
                                                   "--optimizer", "adam", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["params"] == 20_000 and out["without"]["steps"] == out["with"]["steps"] == 4
    assert out["ratio_mean"] > 0 and out["ratio_median"] > 0
    # cuts at versions 2 (warm-up), 4 and 6; a cut still waiting when the next comes is replaced by
    # it, and the last is on disk before the shard answers the bench's closing `stats`
    assert 1 <= out["checkpoints"]["written"] <= 3 and out["checkpoints"]["versions"][-1] == 6
    assert out["checkpoints"]["bytes"] == 3 * 20_000 * 4 + 8  # values, m, v, and the step count
    refused = CliRunner().invoke(bench_checkpoint, ["--params", "20k", "--every", "5", "--steps", "4"])
    assert refused.exit_code == 2 and "--steps 4 is less than --every 5" in refused.output
