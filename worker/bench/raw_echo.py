"""The raw pyzmq reference of `psctl bench pushpull`: an echo server and its client.

What the parameter-server data path is measured against: plain ZeroMQ
request/reply of the same bytes over the same transport, zero-copy on both
sides, no header, no validation, no optimizer, no copy into the caller's
arrays. Whatever `psctl bench pushpull` measures above this is our overhead.

The echo server reuses freed receive buffers exactly as the shards do
(`protocol.buffers.keep_freed_buffers`), and the client side runs in the bench
process beside the ParamClient, which does the same; so the reference is
the transport at its best, not a strawman that page-faults every message.

It also serves the work floor: the same round trip plus the least work
any parameter server must do with those bytes, in numpy. Asked for the
floor, the server subtracts each payload frame, as float32, from a
parameter buffer of its own (one pass: SGD at learning rate 1) before it
replies with those buffers, and the bench client copies each reply frame
into an array of its own. What `psctl bench pushpull` measures above the
floor is the cost of the pscluster machinery itself, not of the work.

Wire form (this module only; it is not the pscluster protocol):

    request   [sizes, payload frame, ...]   sizes: little-endian uint64 byte
              count of every frame the reply must carry (empty: none);
              prefixed with the byte b"u" to ask for the update first
    reply     [b"r", frame, ...]            one frame per requested size,
              sent zero-copy from buffers the server filled once at start
              (with b"u": the parameter buffers, updated)

Run the server as `python -m worker.bench.raw_echo --bind tcp://127.0.0.1:0`; it
prints `READY {json}` with its "addr" and serves until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import zmq

from protocol.buffers import keep_freed_buffers
from protocol.endpoints import check_endpoint, ready_line

# Longest the server sleeps in poll before it looks at its stop flag.
POLL_INTERVAL_MS = 100
# Largest total reply the server builds, so a stray client cannot make it
# allocate without bound.
MAX_REPLY_BYTES = 2 * 1024**3
SIZES_DTYPE = np.dtype("<u8")
REPLY_TAG = b"r"
UPDATE_TAG = b"u"


def filled(nbytes: int) -> np.ndarray:
    """A buffer of `nbytes` whose pages are all written (no lazy zero pages,
    which would make reads look faster than real parameters)."""
    buf = np.empty(nbytes, np.uint8)
    buf.fill(0x5A)
    return buf


class EchoServer:
    """A ROUTER answering each request with the frames it asks for. `serve()` blocks."""

    def __init__(self, bind: str, ctx: zmq.Context | None = None):
        keep_freed_buffers()  # as the shards do: the reference gets the same allocator
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        bind_to = bind.rsplit(":", 1)[0] + ":*" if bind.startswith("tcp://") and bind.endswith(":0") else bind
        self.sock.bind(bind_to)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stopping = False
        self._buffers: dict[int, np.ndarray] = {}  # byte count -> reply buffer, reused forever
        self._params: dict[tuple[int, int], np.ndarray] = {}  # (frame index, byte count) -> float32 buffer

    def stop(self) -> None:
        self.stopping = True

    def _buffer(self, nbytes: int) -> np.ndarray:
        buf = self._buffers.get(nbytes)
        if buf is None:
            buf = self._buffers[nbytes] = filled(nbytes)
        return buf

    def _param(self, index: int, nbytes: int) -> np.ndarray:
        buf = self._params.get((index, nbytes))
        if buf is None:
            buf = self._params[(index, nbytes)] = filled(nbytes).view(np.float32)
            buf.fill(0.0)
        return buf

    def _update(self, payload: Sequence[zmq.Frame]) -> None:
        """The floor's work: each payload frame subtracted, in place, from its parameter buffer."""
        for i, frame in enumerate(payload):
            if len(frame) % 4 == 0:
                param = self._param(i, len(frame))
                np.subtract(param, np.frombuffer(frame.buffer, np.float32), out=param)

    def serve(self) -> None:
        """Answer requests until `stop()`; then close the socket."""
        try:
            while not self.stopping:
                if not self.sock.poll(POLL_INTERVAL_MS):
                    continue
                frames = self.sock.recv_multipart(copy=False)
                if len(frames) < 2:
                    continue  # not ours: nothing sensible to answer
                head = frames[1].bytes
                update = head[:1] == UPDATE_TAG and len(head) % SIZES_DTYPE.itemsize == 1
                if len(head) % SIZES_DTYPE.itemsize and not update:
                    continue
                sizes = np.frombuffer(head[1:] if update else head, SIZES_DTYPE).tolist()
                if sum(sizes) > MAX_REPLY_BYTES:
                    continue
                if update:
                    self._update(frames[2:])
                    bufs = [self._param(i, n) for i, n in enumerate(sizes)]
                else:
                    bufs = [self._buffer(n) for n in sizes]
                reply = [frames[0], REPLY_TAG, *bufs]
                try:
                    self.sock.send_multipart(reply, zmq.DONTWAIT, copy=False)
                except zmq.ZMQError:
                    continue  # the client went away
        finally:
            self.sock.close(0)


class EchoClient:
    """DEALERs to one or more echo servers; `request` is one round trip to each.

    `request` blocks until every server answered and raises TimeoutError
    naming the server that did not within `timeout_s`.
    """

    def __init__(self, addrs: Sequence[str], ctx: zmq.Context | None = None, *, timeout_s: float = 30.0):
        self.ctx = ctx or zmq.Context.instance()
        self.addrs = list(addrs)
        self.timeout_ms = int(timeout_s * 1000)
        self.socks = []
        for addr in self.addrs:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            self.socks.append(sock)

    @staticmethod
    def sizes_frame(reply_sizes: Sequence[int], *, update: bool = False) -> bytes:
        """The first frame of a request whose reply carries frames of `reply_sizes` bytes
        (with `update`, a floor request: the server updates its parameters first)."""
        sizes = np.asarray(list(reply_sizes), SIZES_DTYPE).tobytes()
        return UPDATE_TAG + sizes if update else sizes

    def request(self, sends: Mapping[int, list]) -> list:
        """Send each server k its frames `sends[k]` (sizes frame first) and gather the replies.

        Returns the reply frames (zmq.Frame, not copied) of every server, in
        the order of `sends`.
        """
        for k, frames in sends.items():
            self.socks[k].send_multipart(frames, copy=False)
        replies = []
        for k in sends:
            sock = self.socks[k]
            if not sock.poll(self.timeout_ms):
                raise TimeoutError(f"raw echo server at {self.addrs[k]} did not answer "
                                   f"within {self.timeout_ms / 1000:.0f}s")
            replies.append(sock.recv_multipart(copy=False))
        return replies

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.socks = []


def main(argv: Sequence[str] | None = None) -> None:
    """Serve raw pyzmq echo requests (the reference of `psctl bench pushpull`) until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m worker.bench.raw_echo", description=main.__doc__)
    parser.add_argument("--bind", default="tcp://127.0.0.1:0",
                        help="Address to listen on; port 0 picks a free one (default: %(default)s).")
    bind = parser.parse_args(argv).bind
    try:
        check_endpoint(bind, "--bind")
        server = EchoServer(bind)
    except ValueError as exc:
        sys.exit(f"Error: {exc}")
    except zmq.ZMQError as exc:
        sys.exit(f"Error: cannot listen on {bind}: {exc.strerror}")
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop serving, close, exit 0
        signal.signal(sig, lambda *_: server.stop())
    print(ready_line(role="raw_echo", addr=server.endpoint), flush=True)
    server.serve()


if __name__ == "__main__":
    main()
