"""No input can take the scheduler down: a real-process fuzz test.

A `psctl scheduler` holds one queued job (no shard yet) and one idle
worker. A few DEALER sockets then send it thousands of malformed
messages of many kinds, made deterministically from a seeded
`random.Random`: byte garbage, headers that are not maps, wrong versions,
unknown ops, every scheduler op with wrong field types and out-of-range
values, forged registrations, heartbeats and reports, bad job specs and
submission ids, and the ops a scheduler does not serve.

It proves that every one of them is answered (within a bounded wait) with
a reply that decodes, refuses what must be refused with the expected
error code (never `internal`, which would mean a bug was hit), and echoes
the request id whenever the request's header was readable; that the
scheduler process is alive afterwards and its job still queued; and that
the job then runs to success once a shard starts: nothing the fuzz sent
changed the outcome.

Fuzz inputs are chosen so that none can legitimately change that outcome:
no `shutdown`, no valid `cancel` of the job, no valid `submit`; the only
valid server registrations name shard 7, which a job over shard 0 alone
never plans over (addresses a lax check might let through are sent with
shard ids from 2 up); fake workers ask `assign` only with a wait of zero,
once each. The test waits for every fake peer to be declared dead before
it starts the real shard.

Answers that arrive but are not the expected ones (accepted where a
refusal was due, or a different error code) are asserted last, after the
job has run, so that one run shows both.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import zmq

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.jobspec import min_param_bytes, validate_job
from protocol.messages import (
    KINDS,
    Assign,
    Cancel,
    Checkpoint,
    Create,
    Drop,
    Error,
    Export,
    Heartbeat,
    List,
    Membership,
    Message,
    Ok,
    Pull,
    Push,
    PushPull,
    Register,
    Report,
    SliceData,
    Stats,
    Status,
    Submit,
)
from protocol.version import MAX_RID
from tests.test_jobs import BASE_JOB, job_file, psctl_json, status, wait_until

SEED = 20_240_611
MIN_MESSAGES = 2_000
SOCKETS = 4                       # DEALERs sending at once, one request in flight each
REPLY_TIMEOUT_S = 5.0             # longest wait for any one answer (a held assign is answered at the next tick)
FUZZ_DEADLINE_S = 60.0            # bound on the whole exchange
HEARTBEAT_TIMEOUT_S = 2           # the scheduler's --heartbeat-timeout: fake peers die fast
PEERS_DEAD_TIMEOUT_S = 20.0       # fake peers declared dead after the fuzz
JOB_TIMEOUT_S = 60.0              # the job, once its shard starts
MAX_MESSAGE_BYTES = 1 << 20       # every fuzz message stays under this
HUGE_MODEL_BYTES = 1 << 40        # a spec whose model needs more is refused by any scheduler (--max-model-bytes)

# Units of fuzz (one message, or a short sequence on one socket) per kind.
COUNTS = {
    "raw_junk": 260,
    "not_a_map": 140,
    "bad_version": 110,
    "unknown_op": 110,
    "bad_fields": 480,
    "server_register": 170,
    "server_heartbeat": 170,
    "worker_heartbeat": 170,
    "report": 300,
    "submit": 160,
    "user_ops": 110,
    "unserved_ops": 170,
    "assign": 70,
}
# Of the `assign` units, those from a registered fake worker (held until the next tick, then answered).
HELD_ASSIGNS = 10

OK = "ok"                 # an `ok` reply is right
ANY_ERROR = "*"           # any error code but `internal` is right
MSGPACK_MAX_DEPTH = 1024  # msgpack's unpacker reads values nested this deep, no deeper
FAKE_SHARD = 7            # the one shard id fake servers register as: never part of the job's shards (0..)
FAKE_SERVER_ADDR = "tcp://127.0.0.1:1"
SCHED_OPS = ("register", "heartbeat", "assign", "report", "submit", "status", "cancel", "list", "export", "stats")
EVENTS = ("plan", "initialized", "eval", "done", "release", "stopped", "failed", "final")
UNSERVED_OPS = ("create", "pull", "push", "push_pull", "membership", "checkpoint", "drop", "ok", "error")


@dataclass(frozen=True)
class Case:
    """One message to send and what its answer must be."""

    kind: str
    frames: tuple[bytes, ...]
    rid: int                  # the rid the reply must carry (0 when the request's header is unreadable)
    want: frozenset[str]      # OK and/or error codes (or ANY_ERROR) that are right

    def describe(self) -> str:
        shown = []
        for frame in self.frames[:3]:
            try:
                shown.append(repr(msgpack.unpackb(frame, raw=False, strict_map_key=False)))
            except Exception:
                shown.append(repr(frame))
        more = f" +{len(self.frames) - 3} frames" if len(self.frames) > 3 else ""
        return f"[{self.kind}] {' | '.join(s[:240] for s in shown)}{more}"


@dataclass
class Target:
    """What the fuzz knows of the cluster under test."""

    job: str
    worker: str
    fake_ids: Iterator[int]

    def fake(self, prefix: str) -> str:
        return f"fz-{prefix}-{next(self.fake_ids)}"


# --- building messages ----------------------------------------------------------

def pack(header) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def frames_of(msg: Message) -> tuple[bytes, ...]:
    return tuple(bytes(memoryview(f)) for f in encode(msg))


def header_of(msg: Message) -> dict:
    return msgpack.unpackb(encode(msg)[0], raw=False)


def case(kind: str, msg: Message, *want: str) -> Case:
    return Case(kind, frames_of(msg), msg.rid, frozenset(want))


def raw_case(kind: str, frames, rid: int, *want: str) -> Case:
    return Case(kind, tuple(frames), rid, frozenset(want))


def readable_rid(frames) -> int:
    """The rid a reply to `frames` must carry: the header's, if it can be read, else 0."""
    body = frames[1:] if frames[0] == b"" else frames  # a leading empty frame is a REQ-style delimiter
    if not body:
        return 0
    try:
        header = msgpack.unpackb(body[0], raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception:
        return 0
    rid = header.get("rid", 0) if isinstance(header, dict) else 0
    return rid if type(rid) is int and 0 <= rid <= MAX_RID else 0


ALPHABET = string.ascii_letters + string.digits + " _-.:/\\@#%*\t\n\r\x00\x01\x7f" + "éß漢字🙂\u200b\u202e\u2028٥"


def text(rng: random.Random, longest: int = 40) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, longest)))


def rid(rng: random.Random) -> int:
    return rng.choice([0, 1, rng.randint(2, 1 << 20), rng.randint(0, MAX_RID), MAX_RID])


def junk_value(rng: random.Random, depth: int = 0):
    """A random msgpack-able value: scalars, strings, lists and maps, a few levels deep."""
    choices = [None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, math.nan, math.inf, -math.inf,
               "", "x" * rng.randint(1, 300), text(rng)]
    if depth < 3:
        choices += [[junk_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
                    {text(rng, 12): junk_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}]
    return rng.choice(choices)


def junk_map(rng: random.Random) -> dict:
    return {text(rng, 12): junk_value(rng) for _ in range(rng.randint(0, 6))}


def other_job(rng: random.Random, target: Target) -> str:
    job = rng.choice(["", "nojob", "digits-2", "digits-0", target.job + "x", target.job.upper(), text(rng, 60)])
    return "nojob" if job == target.job else job


# --- one generator per kind of malformed message ---------------------------------------

def gen_raw_junk(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Random bytes, empty frames, too many frames."""
    status_header = frames_of(Status(rid=4242))[0]
    variants = [
        lambda: [rng.randbytes(rng.randint(1, 300))],
        lambda: [bytes([rng.choice([0x80, 0x81, 0x85, 0x8f, 0xde, 0xdf])]) + rng.randbytes(rng.randint(0, 60))],
        lambda: [b""],
        lambda: [b""] * rng.randint(2, 30),
        lambda: [rng.randbytes(rng.randint(0, 100)) for _ in range(rng.randint(2, 60))],
        lambda: [b"", rng.randbytes(rng.randint(1, 80))],
        lambda: [status_header] + [rng.randbytes(rng.randint(0, 50)) for _ in range(rng.randint(1, 200))],
        lambda: [rng.randbytes(rng.randint(1000, 200_000))],
    ]
    for _ in range(COUNTS["raw_junk"]):
        frames = rng.choice(variants)()
        yield [raw_case("raw_junk", frames, readable_rid(frames), ANY_ERROR)]
    # a REQ-style envelope around a good request is answered like any other
    yield [raw_case("raw_junk", [b"", status_header], 4242, OK)]


def gen_not_a_map(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Headers that are not msgpack maps, or not only one."""
    good = frames_of(Status(rid=77))[0]

    def nested(depth: int) -> bytes:  # built by hand: msgpack's packer refuses to nest this deep
        return b"".join(rng.choice([b"\x91", b"\x81\xa1k"]) for _ in range(depth)) + b"\xc0"

    def deep_job() -> Case:  # a map whose `job` nests as deep as msgpack reads: a field of the wrong type
        r = rid(rng)
        head = pack({"v": 1, "op": "status", "rid": r})
        frame = bytes([head[0] + 1]) + head[1:] + pack("job") + nested(rng.randint(100, MSGPACK_MAX_DEPTH - 2))
        return raw_case("not_a_map", [frame], r, "bad_field")

    variants = [
        lambda: pack(rng.choice([0, -5, 2**64 - 1, 1.5, None, True, "status", text(rng), [], [1, "op"]])),
        lambda: pack([{"v": 1, "op": "status", "rid": 5}]),
        lambda: pack(rng.randbytes(rng.randint(0, 50))),                       # bin
        lambda: pack(msgpack.ExtType(rng.randint(0, 127), rng.randbytes(4))),  # ext
        lambda: pack({"v": 1, "op": "status", "rid": 6, "job": rng.randbytes(5)}),  # bin inside
        lambda: msgpack.packb({1: 2, "v": 1}, strict_types=False),             # non-string key
        lambda: good + rng.randbytes(rng.randint(1, 20)),                      # trailing bytes
        lambda: good[:rng.randint(1, len(good) - 1)],                          # cut short
        lambda: nested(rng.randint(MSGPACK_MAX_DEPTH + 1, 5_000)),             # deeper than msgpack reads
        lambda: b"\xdf\xff\xff\xff\xff",                                       # a map claiming 4G entries
        lambda: b"\xdb\xff\xff\xff\xff" + b"x" * 10,                           # a string claiming 4 GB
    ]
    for i in range(COUNTS["not_a_map"]):
        yield [deep_job() if i % 10 == 0 else raw_case("not_a_map", [rng.choice(variants)()], 0, "bad_frame")]


def valid_request(rng: random.Random, target: Target, op: str) -> Message:
    """A well-formed request of `op` that the fuzz may send mutated (unregistered ids, no valid cancel)."""
    r = rid(rng)
    stranger = target.fake("stranger")
    make: dict[str, Callable[[], Message]] = {
        "register": lambda: Register(rid=r, role="worker", worker=stranger, info={"host": "h"}),
        "heartbeat": lambda: Heartbeat(rid=r, role="worker", worker=stranger, job=target.job, state={"parts": {}}),
        "assign": lambda: Assign(rid=r, worker=stranger, wait_s=0.0),
        "report": lambda: Report(rid=r, worker=stranger, job=target.job, event=rng.choice(EVENTS), state={}),
        "submit": lambda: Submit(rid=r, spec=dict(BASE_JOB), submission_id=stranger),
        "status": lambda: Status(rid=r, job=rng.choice(["", target.job])),
        "cancel": lambda: Cancel(rid=r, job=target.job),   # only ever sent with a bad field
        "list": lambda: List(rid=r),
        "export": lambda: Export(rid=r, job=target.job),
        "stats": lambda: Stats(rid=r),
    }
    return make[op]()


# Values of the wrong type for each declared field type (float fields take ints: not wrong).
WRONG_TYPES = {
    "str": [5, -1, 1.5, None, True, [], {}, ["a"], {"a": "b"}],
    "int": ["1", "", 1.5, 1.0, None, True, False, [], {}, [1]],
    "float": ["0", "", None, True, [], {}, [0.0], math.nan, math.inf, -math.inf],
    "dict": [[], "x", "", 5, 0, None, True, 1.5, [["a", 1]]],
    "list": ["x", 5, None, {}, True],
}
BAD_RIDS = [-1, -(2**63), 2**63, 2**64 - 1, 2.0**70, 1.5, "1", None, True, [], {}]
BAD_CLOCKS = [-5, -2, -(2**63), 2**40 + 1, 2**63 - 1, 2**64 - 1]


def field_types(op: str) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(KINDS[op]) if f.name != "slices"}


def gen_bad_fields(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Every scheduler op with a field of the wrong type, out of range, too long, or unknown."""
    for _ in range(COUNTS["bad_fields"]):
        op = rng.choice(SCHED_OPS)
        msg = valid_request(rng, target, op)
        header = header_of(msg)
        frames: list[bytes] = []
        how = rng.choice(["type", "type", "type", "rid", "clock", "long_id", "unknown", "s", "payload"])
        r, want = msg.rid, {"bad_field"}
        if how == "type":
            name, tname = rng.choice(sorted(field_types(op).items()))
            header[name] = rng.choice(WRONG_TYPES[tname])
            if name == "rid":
                r = 0
        elif how == "rid":
            header["rid"], r = rng.choice(BAD_RIDS), 0
        elif how == "clock":
            header["clock"], want = rng.choice(BAD_CLOCKS), {"bad_clock"}
        elif how == "long_id":
            header[rng.choice(["job", "worker"])] = rng.choice("jw😀") * rng.randint(257, 100_000)
        elif how == "unknown":
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(["extra", "slices", "V", "OP", "body", "code", "sids", text(rng, 20),
                                  "k" * rng.randint(100, 50_000)])
                if key not in header:
                    header[key] = junk_value(rng)
            if set(header) <= {"v", "op", "s", *field_types(op)}:
                header["extra"] = 1
        elif how == "s":  # a payload description on an op that carries none
            header["s"], want = rng.choice([[], [[0, "float32", 1, [1]]]]), {"truncated"}
            frames = [np.float32(1).tobytes()] if header["s"] else []
        else:              # payload frames on an op that carries none
            frames, want = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 5))], {"truncated"}
        yield [raw_case("bad_fields", [pack(header), *frames], r, *want)]


def gen_bad_version(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Headers in a protocol version the scheduler does not speak."""
    for _ in range(COUNTS["bad_version"]):
        msg = valid_request(rng, target, rng.choice(SCHED_OPS))
        header = header_of(msg)
        # (not 1.0 or true: Python compares them equal to 1, and the decoder takes them for version 1)
        version = rng.choice(["missing", 0, 2, -1, 255, 2**64 - 1, "1", "", None, [1], {"v": 1}, 1.5])
        if version == "missing":
            del header["v"]
        else:
            header["v"] = version
        yield [raw_case("bad_version", [pack(header)], msg.rid, "bad_version")]


def gen_unknown_op(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Ops that do not exist (the header is otherwise fine)."""
    for _ in range(COUNTS["unknown_op"]):
        op = rng.choice(["", "STATUS", "status ", " status", "Submit", "nope", "__init__", "shutdown\x00",
                         "x" * rng.randint(41, 5_000), text(rng), 5, None, True, 1.5, ["status"], {"op": "list"}])
        if isinstance(op, str) and op in KINDS:
            op = "nope"
        header = {"v": 1, "op": op, "rid": rid(rng)}
        if rng.random() < 0.5:
            header["job"] = target.job
        if rng.random() < 0.5:
            header.pop("op")
        yield [raw_case("unknown_op", [pack(header)], header["rid"], "unknown_op")]


BAD_ADDRESSES = [
    "ipc://", "tcp://host:0", "tcp://:5", "inproc://x", "tcp://a:99999", "  ", "", "tcp://127.0.0.1",
    "tcp://127.0.0.1:", "tcp://127.0.0.1:-1", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:123456",
    "tcp://127.0.0.1:5 ", " tcp://127.0.0.1:5", "udp://127.0.0.1:5", "tcp://[::1:5", "ipc:// x", "ipc://\x00",
    "tcp://a b:5", "tcp://*:5", "pgm://eth0;239.192.1.1:5555", "TCP://127.0.0.1:5", "tcp://127.0.0.1:0x10",
    "tcp://127.0.0.1:5/x", "ipc://" + "p" * 300,
]
# Addresses no one can connect to, though a careless pattern lets them through (`$` matches before a
# final newline, `\d` any Unicode digit, and a host name has no length limit): sent only with shard
# ids no job plans over, so that one wrongly accepted cannot take the job's shard.
SLIPPERY_ADDRESSES = [
    "tcp://127.0.0.1:5\n", "ipc://x\n", "tcp://127.0.0.1:\u0665", "tcp://127.0.0.1:\uff15\uff15",
    "tcp://" + "h" * 70_000 + ":5",
]
BAD_SHARDS = [4096, 4097, 10**6, 2**63 - 1, -2, -100, -(2**63)]


def strictly_valid_address(addr: str) -> bool:
    """Whether `addr` is one a server could really be reached at (the fuzz never registers one)."""
    m = re.fullmatch(r"tcp://([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})", addr, re.ASCII)
    if m:
        return 1 <= int(m.group(2)) <= 65535
    return re.fullmatch(r"ipc://[^\x00-\x20]+", addr) is not None and len(addr) <= 200


def mutated_address(rng: random.Random) -> str:
    addr = list(rng.choice(["tcp://127.0.0.1:5555", "ipc:///tmp/x", "tcp://[::1]:80"]))
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(addr) + 1)
        how = rng.choice(["insert", "delete", "replace"])
        if how == "insert":
            addr.insert(i, rng.choice(ALPHABET))
        elif addr and i < len(addr):
            if how == "delete":
                del addr[i]
            else:
                addr[i] = rng.choice(ALPHABET)
    return "".join(addr)


def gen_server_register(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Servers registering with bad addresses, shard ids out of range, bad roles."""
    made = 0
    while made < COUNTS["server_register"]:
        r = rid(rng)
        how = rng.choice(["address", "address", "slippery", "mutated", "shard", "role", "nameless"])
        if how == "address":
            msg = Register(rid=r, role="server", addr=rng.choice(BAD_ADDRESSES), shard=rng.choice([0, 1, -1, 2, 99]),
                           info=junk_map(rng))
        elif how == "slippery":
            msg = Register(rid=r, role="server", addr=rng.choice(SLIPPERY_ADDRESSES), shard=rng.randint(2, 4095))
        elif how == "mutated":
            addr = mutated_address(rng)
            if strictly_valid_address(addr):
                continue
            msg = Register(rid=r, role="server", addr=addr, shard=rng.randint(2, 4095))
        elif how == "shard":
            msg = Register(rid=r, role="server", addr=FAKE_SERVER_ADDR, shard=rng.choice(BAD_SHARDS))
        elif how == "role":
            msg = Register(rid=r, role=rng.choice(["", "Server", "SERVER", "server ", "client", "scheduler",
                                                    "worker\x00", text(rng)]),
                           worker=target.fake("role"), addr=FAKE_SERVER_ADDR, shard=FAKE_SHARD)
            if msg.role in ("server", "worker"):
                continue
        else:
            msg = Register(rid=r, role="worker", worker="", info=junk_map(rng))
        made += 1
        yield [case("server_register", msg, "bad_field")]


def junk_server_jobs(rng: random.Random, target: Target):
    summary = {"version": junk_value(rng), "epoch": rng.choice([-5, 2**64 - 1, "1", None]),
               "parked": [1, 2], "pushes": {"a": 1}, "min_clock": 1.5, "max_clock": math.nan,
               "staleness_bound": True, "policy": junk_value(rng),
               "clocks": rng.choice([{"w": "x", "p0": -1, "p1": 2**64 - 1, "p2": 3, "p3": [1], "p4": {"a": 1}},
                                     [1, 2], "clocks", None, {text(rng, 300): 1}]),
               "staleness_hist": rng.choice([{"0": 1, "x": 2, "-1": 3, "1": "many", "٣": 4}, [0, 1], 7])}
    return rng.choice([
        [target.job], "jobs", 5, None, {target.job: "summary"}, {target.job: [summary]},
        {target.job: summary}, {text(rng, 20): summary, target.job: {}},
        {"j" * 2_000: summary}, {target.job: {"nested": junk_map(rng)}},
    ])


def gen_server_heartbeat(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Server heartbeats with forged state: from shards no one registered, and from a fake shard."""
    for _ in range(COUNTS["server_heartbeat"]):
        r = rid(rng)
        if rng.random() < 0.5:  # an unknown shard, or a shard id that is no int: asked to register again
            shard = rng.choice(["0", "7", 0.0, 7.0, True, None, [FAKE_SHARD], {"id": 0}, -7, 9999, 2**63 - 1,
                                2**64 - 1, "", text(rng)])
            state = {**junk_map(rng), "shard": shard, "jobs": junk_server_jobs(rng, target)}
            if rng.random() < 0.2:
                state = rng.choice([{}, {"jobs": {target.job: {}}}, junk_map(rng)])
            yield [case("server_heartbeat", Heartbeat(rid=r, role="server", state=state), OK)]
        else:  # the fake shard (registered just before, so alive): its forged table summaries are dropped or cut
            register = Register(rid=r, role="server", addr=FAKE_SERVER_ADDR, shard=FAKE_SHARD, info=junk_map(rng))
            beat = Heartbeat(rid=rid(rng), role="server", job=rng.choice(["", target.job]),
                             state={**junk_map(rng), "shard": FAKE_SHARD, "jobs": junk_server_jobs(rng, target)})
            yield [case("server_heartbeat", register, OK), case("server_heartbeat", beat, OK)]


def junk_parts(rng: random.Random):
    return rng.choice([
        {"x": {}}, {"-1": {"step": 1}}, {"0": {"step": -5}}, {"0": {"step": 1.5}}, {"0": {"from": "a"}},
        {"0": []}, {"0": None}, {"99999999": {}}, {"1024": {"step": 1}}, {"٣": {"step": 1}}, {" 1": {}},
        {"0": {"step": 2**64 - 1, "loss": math.nan, "accuracy": "high", "max_staleness": -1}},
        {str(k): {"step": k} for k in range(1100)}, [], [{"step": 1}], "parts", 5, None, True,
        {"0": {"from": 5, "step": 1, "loss": math.inf}}, {"0": junk_map(rng)},
    ])


def gen_worker_heartbeat(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Worker heartbeats with junk progress: from strangers, from registered fake workers, forged for the real one."""
    for i in range(COUNTS["worker_heartbeat"]):
        state = {"parts": junk_parts(rng), **junk_map(rng)}
        job = rng.choice([target.job, target.job, "", other_job(rng, target)])
        role = rng.choice(["worker", "worker", "", "Worker", text(rng, 10)])
        if i % 10 == 0:  # forged in the real worker's name: the job is queued, so nothing it says counts
            msg = Heartbeat(rid=rid(rng), role="worker", worker=target.worker, job=rng.choice(["", target.job]),
                            state=state)
            yield [case("worker_heartbeat", msg, OK)]
        elif rng.random() < 0.4:  # a stranger: told to register again
            yield [case("worker_heartbeat", Heartbeat(rid=rid(rng), role=role, worker=target.fake("hb"), job=job,
                                                      state=state), OK)]
        else:
            worker = target.fake("hb")
            register = Register(rid=rid(rng), role="worker", worker=worker, info=junk_map(rng))
            beat = Heartbeat(rid=rid(rng), role=role, worker=worker, job=job, state=state)
            yield [case("worker_heartbeat", register, OK), case("worker_heartbeat", beat, OK)]


def junk_report_state(rng: random.Random) -> dict:
    state = rng.choice([
        {"tensors": rng.choice([[], "x", None, [["w", [2, 2], "float128"]], [["", [1], "float32"]],
                                [["w", [-1], "float32"]], [["w", [1], "float32"]] * 2, [["w", [1]]],
                                [["w", [1], "float32", 9]], [[5, [1], "float32"]],
                                [["w", [2**63], "float32"]], [[f"t{k}", [k], "float32"] for k in range(2_000)]]),
         "train_size": rng.choice([-1, 0, "many", True, 1.5, None, 2**64 - 1]),
         "nonlearned": rng.choice(["w", [1], ["nope"], None, {}])},
        {"release": rng.choice(["0", [0, 0], [-1], [1.5], {}, [True], [2**64 - 1], None, list(range(2000))])},
        {"error": rng.choice([{"a": 1}, ["x"], 5, "e" * 200_000, "", None, "\x00\n"]),
         "fatal": rng.choice(["yes", 1, [True], {"fatal": True}, None, "true"])},
        {"test_accuracy": rng.choice([2, -1, "high", math.nan, math.inf, None, True, [0.5]]),
         "test_loss": junk_value(rng), "step": junk_value(rng)},
        {"parts": junk_parts(rng)},
        junk_map(rng),
        {},
    ])
    if rng.random() < 0.3:
        state["parts"] = junk_parts(rng)
    return state


def gen_report(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Reports of every event: unknown events, from strangers, from fake workers that hold nothing."""
    for _ in range(COUNTS["report"]):
        state = junk_report_state(rng)
        job = rng.choice([target.job, target.job, "", other_job(rng, target)])
        how = rng.choice(["event", "stranger", "holds_nothing", "holds_nothing"])
        if how == "event":
            event = rng.choice(["", "PLAN", "done ", "finished", "shutdown", "cancel", "x" * 1_000, text(rng)])
            if event in EVENTS:
                event = "nope"
            worker = rng.choice([target.fake("rp"), ""])
            yield [case("report", Report(rid=rid(rng), worker=worker, job=job, event=event, state=state),
                        "bad_field")]
        elif how == "stranger":
            msg = Report(rid=rid(rng), worker=rng.choice([target.fake("rp"), ""]), job=job,
                         event=rng.choice(EVENTS), state=state)
            yield [case("report", msg, "bad_state")]
        else:  # registered just before; it has no part in any job (none runs): told to stop
            worker = target.fake("rp")
            register = Register(rid=rid(rng), role="worker", worker=worker)
            msg = Report(rid=rid(rng), worker=worker, job=job, event=rng.choice(EVENTS), state=state)
            yield [case("report", register, OK), case("report", msg, OK)]


SPEC_MUTATIONS = [
    ("name", ["", "-x", "a" * 65, 5, None, "a b", "ünï", "x/y", [], "digits\x00"]),
    ("workers", [0, -1, 1025, "2", 2.5, True, None, [1], 2**64 - 1]),
    ("steps", [0, -5, 10**9 + 1, "many", [], {}, 1.5, math.nan, math.inf, True]),
    ("seed", [-1, 2**32, "0", 0.5, None]),
    ("model", ["mlp", [], {}, {"kind": "rnn"}, {"kind": "mlp", "hidden": [0]}, {"kind": "mlp", "hidden": [64] * 65},
               {"kind": "mlp", "hidden": [2**40]}, {"kind": "cnn", "kernel": 4}, {"kind": "mlp", "colour": "red"},
               {"kind": "mlp", "hidden": "64"}, {"kind": "mlp", "dropout": 1.0}, None]),
    ("data", ["sklearn:digits", {"source": "sklearn:iris"}, {"source": ""}, {"source": 5},
              {"source": "sklearn:digits", "batch_size": 0}, {"source": "sklearn:digits", "micro_batches": 3},
              {"source": "ftp://x"}, {"source": "npz:"}, {}, None]),
    ("optimizer", [{"kind": "adamw"}, {"lr": -1}, {"lr": math.nan}, {"lr": "1e-3"}, {"kind": "sgd", "nesterov": True},
                   {"schedule": {"kind": "linear"}}, {"schedule": "x"}, "sgd", {"momentum": 1.0}]),
    ("consistency", [{"policy": "eventual"}, {"policy": "ssp", "staleness": -1}, {"staleness": 10**7}, "bsp", [],
                     {"policy": "bsp", "x": 1}]),
    ("target_accuracy", [0, 1.5, -0.5, "0.9", math.nan]),
    ("epochs", [1, 0, -1]),            # 1: steps and epochs together
    ("colour", ["red"]),
    ("k" * 5_000, [1]),
    ("eval_every", [-1, 10**9 + 1, "often"]),
    ("partition_bytes", [0, 1023, 2**31, "1MiB"]),
]


def bad_spec(rng: random.Random) -> dict:
    """A job spec with one to three bad fields, checked locally to be refused."""
    for _ in range(100):
        spec = dict(BASE_JOB)
        for key, values in rng.sample(SPEC_MUTATIONS, rng.randint(1, 3)):
            spec[key] = rng.choice(values)
        if rng.random() < 0.1:
            spec.pop(rng.choice(["model", "data", "steps"]))
        try:
            refused = min_param_bytes(validate_job(spec)) > HUGE_MODEL_BYTES
        except Exception:
            refused = True
        if refused:
            return spec
    raise AssertionError("no refused spec made in 100 tries")


def gen_submit(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Submits of bad specs, and of a good spec with a bad submission id."""
    for _ in range(COUNTS["submit"]):
        how = rng.choice(["spec", "spec", "sid", "not_a_map"])
        if how == "spec":
            msg = Submit(rid=rid(rng), spec=bad_spec(rng), submission_id=rng.choice(["", target.fake("sub")]))
            yield [case("submit", msg, "bad_spec")]
        elif how == "sid":
            sid = rng.choice(["s" * rng.randint(129, 100_000), "a\x00b", "line\n", "tab\t", "\x7f", "\u2028",
                              "zero\u200bwidth", "bell\x07" * 3, text(rng, 20) + "\x01"])
            msg = Submit(rid=rid(rng), spec=rng.choice([dict(BASE_JOB), bad_spec(rng)]), submission_id=sid)
            yield [case("submit", msg, "bad_field")]
        else:
            header = header_of(Submit(rid=rid(rng)))
            header["spec"] = rng.choice([[], "name: x", 5, None, [["name", "x"]], True])
            yield [raw_case("submit", [pack(header)], header["rid"], "bad_field")]


def gen_user_ops(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Status, export and cancel of jobs that do not exist (and the few users' requests that are fine)."""
    for _ in range(COUNTS["user_ops"]):
        job = other_job(rng, target) or "nojob"
        r = rid(rng)
        yield [rng.choice([
            case("user_ops", Status(rid=r, job=job), "unknown_job"),
            case("user_ops", Export(rid=r, job=job), "unknown_job"),
            case("user_ops", Cancel(rid=r, job=job), "unknown_job"),
            case("user_ops", Cancel(rid=r, job=""), "unknown_job"),
            case("user_ops", Export(rid=r, job=target.job), "bad_state"),  # queued: no parameters yet
            case("user_ops", Status(rid=r, worker=text(rng), clock=rng.randint(-1, 100)), OK),
            case("user_ops", Status(rid=r, job=target.job), OK),
            case("user_ops", List(rid=r, job=job), OK),
            case("user_ops", Stats(rid=r), OK),
        ])]


def payload_slices(rng: random.Random) -> tuple:
    dtype = rng.choice(["float32", "float64", "int64", "uint8", "float16", "int32"])
    return tuple(SliceData(sid, np.arange(rng.randint(0, 64), dtype=dtype)) for sid in rng.sample(range(100), 3))


def unserved_request(rng: random.Random, target: Target, op: str) -> Message:
    """A well-formed message of an op the scheduler does not serve (shard requests, replies)."""
    r, job = rid(rng), rng.choice([target.job, "", "nojob"])
    make: dict[str, Callable[[], Message]] = {
        "create": lambda: Create(rid=r, job=job, plan=junk_map(rng), optimizer={"kind": "sgd"},
                                 nonlearned=["x"], slices=payload_slices(rng)),
        "pull": lambda: Pull(rid=r, job=job, sids=[0, 1, 2], clock=rng.randint(-1, 100)),
        "push": lambda: Push(rid=r, job=job, worker=target.worker, clock=3, parts=[0], slices=payload_slices(rng)),
        "push_pull": lambda: PushPull(rid=r, job=job, sids=[1], slices=payload_slices(rng)),
        "membership": lambda: Membership(rid=r, job=job, epoch=2**40, workers={"p0": 0}, holders={"p0": ""}),
        "checkpoint": lambda: Checkpoint(rid=r, job=job),
        "drop": lambda: Drop(rid=r, job=job),
        "ok": lambda: Ok(rid=r, job=job, body=junk_map(rng), slices=payload_slices(rng)),
        "error": lambda: Error(rid=r, job=job, code="internal", message=text(rng)),
    }
    return make[op]()


def gen_unserved_ops(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Shard ops and replies, sent to the scheduler; payloads good and bad."""
    for _ in range(COUNTS["unserved_ops"]):
        msg = unserved_request(rng, target, rng.choice(UNSERVED_OPS))
        r = msg.rid
        frames = list(frames_of(msg))
        want = ["unknown_op"]
        if msg.HAS_PAYLOAD and rng.random() < 0.5:  # a payload that does not match its description
            header = msgpack.unpackb(frames[0], raw=False)
            how = rng.choice(["length", "dtype", "frames", "meta", "twice", "shape"])
            if how == "length":
                frames[1] = frames[1] + b"\x00" * rng.randint(1, 7)
                want = ["bad_length"]
            elif how == "dtype":
                header["s"][0][1] = rng.choice(["object", "float128", "complex64", "<f4", "", 5, None])
                want = ["bad_dtype"]
            elif how == "frames":
                frames = frames[:-1] if rng.random() < 0.5 else frames + [b"\x00" * 8]
                want = ["truncated"]
            elif how == "meta":
                header["s"] = rng.choice(["s", 5, [[0, "float32"]], [None, None, None], [[-1, "float32", 0, [0]]] * 3,
                                          [[0, "float32", -1, [-1]]] * 3, [[0, "float32", 0, "0"]] * 3])
                want = ["bad_field", "truncated"]
            elif how == "twice":
                header["s"][1][0] = header["s"][0][0]
                want = ["bad_field"]
            else:
                header["s"][0][3] = [header["s"][0][2] + 1]
                want = ["bad_field"]
            frames[0] = pack(header)
        yield [raw_case("unserved_ops", frames, r, *want)]


def gen_assign(rng: random.Random, target: Target) -> Iterator[list[Case]]:
    """Assigns from strangers (refused), and from fake workers asking to wait no time at all."""
    for i in range(COUNTS["assign"]):
        if i < HELD_ASSIGNS:  # answered "no task" at the scheduler's next tick; each fake worker asks once
            worker = target.fake("as")
            yield [case("assign", Register(rid=rid(rng), role="worker", worker=worker), OK),
                   case("assign", Assign(rid=rid(rng), worker=worker, job=rng.choice(["", target.job]),
                                         wait_s=rng.choice([0.0, -1.0, -1e300, -0.0])), OK)]
        else:
            msg = Assign(rid=rid(rng), worker=rng.choice([target.fake("as"), "", text(rng)]), job=target.job,
                         wait_s=rng.choice([0.0, 30.0, 1e300, -5.0]))
            yield [case("assign", msg, "bad_state")]


GENERATORS = [gen_raw_junk, gen_not_a_map, gen_bad_version, gen_unknown_op, gen_bad_fields, gen_server_register,
              gen_server_heartbeat, gen_worker_heartbeat, gen_report, gen_submit, gen_user_ops, gen_unserved_ops,
              gen_assign]


def fuzz_units(target: Target) -> list[list[Case]]:
    """Every unit of every kind, in a seeded shuffled order."""
    rng = random.Random(SEED)
    units = [unit for gen in GENERATORS for unit in gen(rng, target)]
    rng.shuffle(units)
    return units


# --- sending and judging -------------------------------------------------------

@dataclass
class Outcome:
    """What the exchange saw: replies by kind, and what was wrong with them."""

    seen: Counter = dataclasses.field(default_factory=Counter)
    answered: int = 0
    broken: list[str] = dataclasses.field(default_factory=list)   # unanswered, undecodable, internal, wrong rid
    wrong: list[str] = dataclasses.field(default_factory=list)    # an answer, but not the right one


def judge(c: Case, frames: list[bytes], out: Outcome) -> None:
    """Check one answer; count it and note what is wrong with it."""
    out.answered += 1
    if c.frames[0] == b"":  # a REQ-style envelope: the reply comes back behind the same empty delimiter
        if not frames or frames[0] != b"":
            out.broken.append(f"the reply to a REQ-style request lacks its empty delimiter: {c.describe()}")
            return
        frames = frames[1:]
    try:
        reply = decode(frames)
    except ProtocolError as exc:
        out.broken.append(f"the reply does not decode ({exc}): {c.describe()}")
        return
    what = f"error {reply.code}" if isinstance(reply, Error) else reply.OP
    out.seen[f"{c.kind}: {what}"] += 1
    if not isinstance(reply, (Ok, Error)):
        out.broken.append(f"the reply is a {reply.OP!r}, neither ok nor error: {c.describe()}")
    elif isinstance(reply, Error) and reply.code == "internal":
        out.broken.append(f"internal error (a bug was hit): {reply.message}: {c.describe()}")
    elif reply.rid != c.rid:
        out.broken.append(f"reply rid {reply.rid}, expected {c.rid}: {c.describe()}")
    elif isinstance(reply, Ok) and OK not in c.want:
        out.wrong.append(f"accepted (ok {str(reply.body)[:200]}), expected {sorted(c.want)}: {c.describe()}")
    elif isinstance(reply, Error) and ANY_ERROR not in c.want and reply.code not in c.want:
        out.wrong.append(f"error {reply.code} ({reply.message[:200]}), expected {sorted(c.want)}: {c.describe()}")


def exchange(make_socket: Callable[[], zmq.Socket], units: list[list[Case]]) -> Outcome:
    """Send every case, up to SOCKETS at once (a unit's cases in order on one socket); judge every answer."""
    lanes = [[c for unit in units[k::SOCKETS] for c in unit] for k in range(SOCKETS)]
    socks = [make_socket() for _ in range(SOCKETS)]
    nxt = [0] * SOCKETS
    inflight: dict[int, tuple[Case, float]] = {}
    out = Outcome()
    total = sum(map(len, lanes))
    deadline = time.monotonic() + FUZZ_DEADLINE_S
    for _ in range(total * 4 + 1000):  # bound: each pass sends or receives at least one, or a lane times out
        for k in range(SOCKETS):
            if k not in inflight and nxt[k] < len(lanes[k]):
                c = lanes[k][nxt[k]]
                nxt[k] += 1
                socks[k].send_multipart(c.frames)
                inflight[k] = (c, time.monotonic() + REPLY_TIMEOUT_S)
        if not inflight or time.monotonic() > deadline:
            break
        poller = zmq.Poller()
        for k in inflight:
            poller.register(socks[k], zmq.POLLIN)
        wait_ms = max(1, int(1000 * (min(d for _c, d in inflight.values()) - time.monotonic())))
        ready = dict(poller.poll(min(wait_ms, 200)))
        for k in list(inflight):
            c, due = inflight[k]
            if socks[k] in ready:
                judge(c, socks[k].recv_multipart(zmq.NOBLOCK), out)
                del inflight[k]
            elif time.monotonic() > due:
                out.broken.append(f"no answer within {REPLY_TIMEOUT_S}s: {c.describe()}")
                socks[k].close(0)  # a late answer must not be taken for the next request's
                socks[k] = make_socket()
                del inflight[k]
    if sum(nxt) < total or inflight:
        out.broken.append(f"{total - sum(nxt)} never sent, {len(inflight)} unanswered at the deadline")
    return out


# --- the test -------------------------------------------------------------------

def only_real_peers(addr: str, worker: str) -> bool:
    """Every fake peer declared dead: the one real worker, waiting, and no server."""
    cluster = status(addr)
    workers = cluster["workers"]
    return (not cluster["servers"] and len(workers) == 1 and workers[0]["worker"] == worker
            and workers[0]["waiting"])


def test_no_input_takes_the_scheduler_down(procs, tmp_path, dealer):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout",
                        str(HEARTBEAT_TIMEOUT_S))
    addr = sched.ready["addr"]
    job = psctl_json("submit", job_file(tmp_path, workers=1, steps=60), "--scheduler", addr)["job"]
    worker = procs.start("worker", "--scheduler", addr).ready["worker"]
    wait_until(lambda: only_real_peers(addr, worker), timeout=30, what="the worker registered and idle")
    assert status(addr, job)["state"] == "queued"  # no shard: the job waits

    units = fuzz_units(Target(job=job, worker=worker, fake_ids=iter(range(1, 10**9))))
    cases = [c for unit in units for c in unit]
    kinds = Counter(c.kind for c in cases)
    assert len(cases) >= MIN_MESSAGES and set(kinds) == set(COUNTS), kinds
    assert all(sum(map(len, c.frames)) < MAX_MESSAGE_BYTES for c in cases)

    out = exchange(lambda: dealer(addr), units)
    # every message answered, with a reply that decodes and names its request; no bug hit
    assert not out.broken, (f"{len(out.broken)} of {len(cases)} messages were not answered properly:\n"
                            + "\n".join(out.broken[:30]))
    assert out.answered == len(cases)

    # alive, still serving, and nothing the fuzz sent touched the job
    assert sched.popen.poll() is None, sched.stderr()
    listed = psctl_json("list", "--scheduler", addr)["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(job, "queued")]
    sock = dealer(addr)
    sock.send_multipart(encode(Stats(rid=9)))
    stats = decode(sock.recv_multipart())
    errors = sum(n for what, n in out.seen.items() if ": error " in what)
    assert isinstance(stats, Ok) and stats.rid == 9 and stats.body["rejected_total"] >= errors, stats

    # once every fake peer is declared dead, a real shard runs the job to the end
    wait_until(lambda: only_real_peers(addr, worker), timeout=PEERS_DEAD_TIMEOUT_S, what="fake peers declared dead")
    procs.server(0, "--scheduler", addr)
    wait_until(lambda: status(addr, job)["state"] in ("succeeded", "failed", "cancelled"), timeout=JOB_TIMEOUT_S,
               what="the job ended")
    final = status(addr, job)
    assert final["state"] == "succeeded", final.get("error")
    assert sched.popen.poll() is None
    log = open(sched.stderr_file.name, errors="replace").read()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]

    # and every malformed message was refused (the few acceptable ones accepted), with the right code
    assert not out.wrong, (f"{len(out.wrong)} of {len(cases)} answers were not the expected ones:\n"
                           + "\n".join(out.wrong[:30]) + f"\nreplies: {dict(out.seen)}")
