"""A job's history (`psctl logs`): what the scheduler noted, on disk, readable while and after it runs.

The machine's notes are checked event by event (tests/sched_driver.py), the
store's pages directly, and the command against real processes: the
history of a finished job, the same history after the scheduler restarts,
`--follow` ending when the job does, and an unknown job refused.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from protocol.messages import Cancel, Logs, Ok
from ps.registry import JobStore
from ps.sched.events import Note, ReadNotes
from ps.sched.state import MAX_NOTES_PER_JOB
from tests import sched_driver as sd
from tests.procs import PSCTL, run_psctl
from tests.test_jobs import WAIT_S, job_file, psctl_json, start_cluster

# --- the machine ------------------------------------------------------------------------------------


def test_a_jobs_history_follows_its_life_in_order():
    d = sd.Driver()
    job = sd.two_holders(d, sd.spec())
    assert d.events(job) == ["submitted", "started", "initialising", "assigned", "planned", "released", "assigned"]
    texts = [n.text for n in d.notes if n.job == job]
    assert texts[3] == "w1 assigned partitions 0,1 (initialises the parameters)"
    assert texts[5] == "w1 gave back partitions 1 for a worker that joined"
    assert texts[6] == "w2 assigned partitions 1"
    assert all(n.ts == pytest.approx(d.now) for n in d.notes)   # wall time: now + the machine's offset


def test_a_silent_worker_and_a_cancel_are_in_the_history():
    d = sd.Driver()
    job = sd.two_holders(d, sd.spec())
    d.tick(sd.TIMEOUT + 1, alive=["w1"])                        # w2 falls silent
    lost = [n for n in d.notes if n.kind == "worker_lost"]
    assert len(lost) == 1 and lost[0].job == job and lost[0].facts == {"worker": "w2"}
    assert "w2 stopped answering" in lost[0].text and "partitions 1 go to others" in lost[0].text
    assert isinstance(d.ask("admin", Cancel(job=job)), Ok)
    assert d.events(job)[-1] == "cancelled"


def test_logs_is_answered_by_the_daemon_from_the_store():
    d = sd.Driver()
    job = d.submit(sd.spec())
    out = d.send("user", Logs(job=job, after=3, limit=10))
    assert out == [ReadNotes("user", out[0].rid, job, 3, 10, "queued")]
    sd.assert_error(d.ask("user", Logs(job="nope-9")), "unknown_job")
    sd.assert_error(d.ask("user", Logs(job=job, after=-1)), "bad_field", "after")
    assert d.send("user", Logs(job=job, limit=10**9))[0].limit == 500   # one page at most


def test_a_flapping_job_notes_a_bounded_history():
    d = sd.Driver()
    job = d.submit(sd.spec())
    for _ in range(MAX_NOTES_PER_JOB + 50):
        d.m._note(job, "assigned", "again")
    d.handle(sd.Tick(d.now))
    mine = [n for n in d.notes if n.job == job]
    assert len(mine) == MAX_NOTES_PER_JOB and mine[-1].kind == "truncated"


def test_the_store_pages_a_jobs_events(tmp_path):
    store = JobStore(tmp_path)
    store.add_events([Note("a-1", 10.0 + k, "assigned", f"event {k}", {"k": k}) for k in range(7)]
                     + [Note("b-2", 1.0, "submitted", "other job")])
    first = store.events("a-1", 0, 3)
    assert [e["text"] for e in first] == ["event 0", "event 1", "event 2"] and first[0]["k"] == 0
    rest = store.events("a-1", first[-1]["seq"], 100)
    assert [e["text"] for e in rest] == [f"event {k}" for k in range(3, 7)]
    store.close()
    again = JobStore(tmp_path)                                   # on disk: a new scheduler reads them
    assert [e["kind"] for e in again.events("b-2", 0, 10)] == ["submitted"]
    again.close()


# --- real processes ------------------------------------------------------------------------------


def test_psctl_logs_prints_a_finished_jobs_history_and_it_survives_a_restart(procs, tmp_path):
    addr = start_cluster(procs, tmp_path, workers=2)
    job = psctl_json("submit", job_file(tmp_path, steps=60), "--wait", "--scheduler", addr)["job"]
    result = run_psctl("logs", job, "--scheduler", addr, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    kinds = [line.split()[1] for line in lines]
    assert kinds[:2] == ["submitted", "started"] and kinds[-1] == "ended", lines
    assert {"initialising", "planned", "assigned", "partitions_done", "evaluating"} <= set(kinds), lines
    assert lines[-1].endswith("succeeded: 120/120 steps, test accuracy " + lines[-1].rsplit(" ", 1)[1])
    assert all(line[:4].isdigit() and line[23] == "Z" for line in lines), lines   # UTC times
    events = [json.loads(line) for line in run_psctl("logs", job, "--json", "--scheduler", addr,
                                                     timeout=60).stdout.splitlines()]
    assert [e["kind"] for e in events] == kinds and events[-1]["state"] == "succeeded"
    assert events[-1]["steps_done"] == 120

    # the scheduler restarts on the same state directory: the history is still there
    sched = procs.procs[0]
    sched.stop()
    again = procs.start("scheduler", "--state-dir", str(tmp_path / "state"), "--bind", addr)
    assert again.ready["addr"] == addr
    assert run_psctl("logs", job, "--scheduler", addr, timeout=60).stdout.splitlines() == lines


def test_psctl_logs_follow_ends_with_the_job(procs, tmp_path):
    addr = start_cluster(procs, tmp_path, workers=1)
    job = psctl_json("submit", job_file(tmp_path, workers=1, steps=300), "--scheduler", addr)["job"]
    follow = subprocess.Popen([PSCTL, "logs", job, "--follow", "--scheduler", addr], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        out, err = follow.communicate(timeout=WAIT_S)
    finally:
        follow.kill()
        follow.wait(timeout=10)
    assert follow.returncode == 0, err
    kinds = [line.split()[1] for line in out.splitlines()]
    assert kinds[0] == "submitted" and kinds[-1] == "ended", out
    assert psctl_json("status", job, "--scheduler", addr)["state"] == "succeeded"


def test_psctl_logs_of_an_unknown_job_is_one_sentence(procs, tmp_path):
    addr = start_cluster(procs, tmp_path, workers=0)
    result = run_psctl("logs", "nope-1", "--scheduler", addr, timeout=60)
    assert result.returncode != 0 and "no job 'nope-1'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
