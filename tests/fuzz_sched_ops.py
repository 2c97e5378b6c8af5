"""The scheduler's own ops, malformed, for the fuzz test: forged registrations, heartbeats and
reports, bad specs and submission ids, user ops on unknown jobs, ops it does not serve, assigns.
Helpers and the `Case` type are in tests/fuzz_messages.py."""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator

import msgpack
import numpy as np

from protocol.jobspec import min_param_bytes, validate_job
from protocol.messages import (
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
from tests.fuzz_messages import (
    ALPHABET,
    COUNTS,
    EVENTS,
    FAKE_SERVER_ADDR,
    FAKE_SHARD,
    HELD_ASSIGNS,
    HUGE_MODEL_BYTES,
    OK,
    SEED,
    UNSERVED_OPS,
    Case,
    Target,
    case,
    frames_of,
    gen_bad_fields,
    gen_bad_version,
    gen_not_a_map,
    gen_raw_junk,
    gen_unknown_op,
    header_of,
    junk_map,
    junk_value,
    other_job,
    pack,
    raw_case,
    rid,
    text,
)
from tests.test_jobs import BASE_JOB

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

