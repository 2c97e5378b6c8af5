"""Real processes on loopback, the way ps-lite tests itself.

Two `psctl server` processes, a table whose largest tensor is bigger than
partition_bytes (so it is split over both shards), two client processes that
each push a known gradient 50 times with SGD at learning rate 1: the pulled
values must equal `initial - 100 * g` exactly.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from protocol.plan import make_plan
from tests.procs import run_psctl
from worker.client import ParamClient

SHAPES = {"w": (600, 1000), "b": (1000,)}
PARTITION_BYTES = 1 << 20
PUSHES = 50

PUSHER = r"""
import json, sys
import numpy as np
from protocol.plan import make_plan
from worker.client import ParamClient
addrs, shapes, pb, worker, pushes = json.loads(sys.argv[1])
plan = make_plan({k: (tuple(v), "float32") for k, v in shapes.items()}, len(addrs), pb)
grads = {k: ((np.arange(int(np.prod(v))) % 17 - 8) * 0.25).astype(np.float32).reshape(v) for k, v in shapes.items()}
with ParamClient(addrs, plan, job="core", worker=worker, timeout_s=20) as client:
    for step in range(pushes):
        if step % 2:
            client.push(grads)
        else:
            client.push_pull(grads)
print("done", worker)
"""


def known_gradient(shape):
    return ((np.arange(int(np.prod(shape))) % 17 - 8) * 0.25).astype(np.float32).reshape(shape)


def test_two_servers_two_clients_exact_arithmetic(procs):
    servers = [procs.server(k) for k in range(2)]
    addrs = [s.ready["addr"] for s in servers]
    plan = make_plan({k: (v, "float32") for k, v in SHAPES.items()}, 2, PARTITION_BYTES)
    initial = {k: (np.arange(int(np.prod(v))) % 2001 - 1000).astype(np.float32).reshape(v) for k, v in SHAPES.items()}
    with ParamClient(addrs, plan, job="core", timeout_s=20) as client:
        client.create(initial, optimizer={"kind": "sgd", "lr": 1.0})
        stats = client.stats()
        # the big tensor is split over both shards
        assert all("w" in s["jobs"]["core"]["names"] for s in stats)
        assert sum(s["jobs"]["core"]["bytes"] for s in stats) == 4 * (600 * 1000 + 1000)

        args = [json.dumps([addrs, {k: list(v) for k, v in SHAPES.items()}, PARTITION_BYTES, f"c{i}", PUSHES])
                for i in range(2)]
        pushers = [subprocess.Popen([sys.executable, "-c", PUSHER, a], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for a in args]
        try:
            for p in pushers:
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
        finally:
            for p in pushers:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)

        final = client.pull()
        for name, shape in SHAPES.items():
            expected = initial[name] - np.float32(2 * PUSHES) * known_gradient(shape)
            np.testing.assert_array_equal(final[name], expected)
        stats = client.stats()
        assert sum(s["pushes"] for s in stats) == 2 * 2 * PUSHES  # each push reaches both shards
        assert all(s["rejected_total"] == 0 for s in stats)


def test_server_on_a_port_in_use_says_so_in_one_sentence():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run_psctl("server", "--bind", f"tcp://127.0.0.1:{port}", "--shard-id", "0", timeout=60)
    finally:
        taken.close()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0] and "in use" in lines[0]


@pytest.mark.parametrize("args, needle", [
    (["server", "--shard-id", "0", "--bind", "localhost:99"], "not an address"),
    (["server", "--shard-id", "-1"], "shard-id"),
    (["server", "--shard-id", "0", "--max-message-bytes", "lots"], "not a size"),
])
def test_bad_server_arguments_are_one_sentence(args, needle):
    result = run_psctl(*args, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert needle in result.stderr
