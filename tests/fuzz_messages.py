"""Malformed messages for the scheduler fuzz test (tests/test_sched_fuzz.py), made from a seeded RNG.

Each generator yields units: one message, or a short sequence on one
socket, each with the answers that are right for it (a `Case`). Inputs are
chosen so that none can legitimately change the fuzzed scheduler's queued
job (see the test's docstring).
"""
from __future__ import annotations

import dataclasses
import math
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import numpy as np

from protocol.codec import encode
from protocol.messages import (
    KINDS,
    Assign,
    Cancel,
    Export,
    Heartbeat,
    List,
    Message,
    Register,
    Report,
    Stats,
    Status,
    Submit,
)
from protocol.version import MAX_RID
from tests.test_jobs import BASE_JOB

SEED = 20_240_611
MIN_MESSAGES = 2_000
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
