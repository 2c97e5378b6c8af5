"""How the image layers (worker/nn/conv.py, worker/nn/pool.py) go through a batch.

A pass cuts the batch into chunks of images small enough that what one
chunk writes (a patch matrix, a window copy) is still in cache when the next
step reads it, and keeps those scratch arrays between calls (`Scratch`).

On numpy the chunks can be shared out over a few threads (`run_chunks`):
numpy releases the GIL in its loops, and its element-wise work (im2col,
copies, pooling) otherwise runs on one core while only BLAS uses the others.
That pays only where BLAS's idle threads sleep: OpenBLAS's spin for ~0.1 s
after each call unless OPENBLAS_THREAD_TIMEOUT was small when numpy loaded
(see blas_spins), and a spinning thread takes a core from the helpers. So by
default the chunks run on the calling thread, the matmuls on BLAS's threads;
with the variable set (e.g. OPENBLAS_THREAD_TIMEOUT=4 in a worker's
environment) the chunks, matmuls included, run on BLAS's number of threads.

Nothing here changes a result: each chunk writes its own slice of the
outputs, and what the chunks add up is summed by the caller in chunk order.
On cupy there is one chunk and no thread.
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# What one chunk's largest scratch array (a patch matrix, a window copy) may
# take. On the 2-core EPYC this was tuned on (512 KiB of L2 per core, 32 MiB
# of L3, ~10 GB/s from memory), 1-2 MiB chunks ran the bench CNN's layers
# about 1.5x faster than whole-batch arrays; smaller ones lose to per-call cost.
CHUNK_BYTES = 2 << 20
# Most threads a pass's chunks are spread over (the caller's included); the
# work is memory-bound, so more than a few add little.
MAX_THREADS = 4


class Scratch:
    """Arrays kept between calls, by name, shape and dtype: a batch's last,
    shorter chunk gets arrays of its own instead of remaking the others. A
    new array is prepared by `init` (if given); callers never write the
    parts that `init` set. A name keeps its SHAPES_KEPT latest shapes."""

    SHAPES_KEPT = 4

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self._arrays: dict[Any, dict[Any, Any]] = {}

    def get(self, name: Any, shape: tuple[int, ...], dtype: Any,
            init: Callable[[Any], Any] | None = None) -> Any:
        kept = self._arrays.setdefault(name, {})
        key = (tuple(shape), np.dtype(dtype))
        array = kept.pop(key, None)
        if array is None:
            array = self.xp.empty(shape, dtype=dtype)
            if init is not None:
                init(array)
            if len(kept) >= self.SHAPES_KEPT:
                kept.pop(next(iter(kept)))
        kept[key] = array  # latest last
        return array


class Scratches:
    """One Scratch per thread slot (see run_chunks), on one array module."""

    def __init__(self) -> None:
        self._slots: list[Scratch] = []
        self._lock = threading.Lock()

    def __call__(self, slot: int, xp: Any) -> Scratch:
        slots = self._slots
        if len(slots) <= slot or slots[0].xp is not xp:
            with self._lock:
                if self._slots and self._slots[0].xp is not xp:
                    self._slots = []
                while len(self._slots) <= slot:
                    self._slots.append(Scratch(xp))
                slots = self._slots
        return slots[slot]


def zero(array: Any) -> None:
    array.fill(0)


def chunks(n: int, bytes_per_image: int, xp: Any) -> list[tuple[int, int]]:
    """(start, stop) of near-equal runs of the images 0..n-1, each run's
    scratch within CHUNK_BYTES; one run on anything but numpy (a GPU wants
    the whole batch in each kernel)."""
    most = max(1, CHUNK_BYTES // max(1, bytes_per_image)) if xp is np else n
    count = max(1, -(-n // most))
    size = -(-n // count)
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def run_chunks(count: int, fn: Callable[[int, int], None], xp: Any) -> None:
    """fn(item, slot) for items 0..count-1, on the calling thread and up to
    helper_threads() pool threads, each taking the next item when free;
    `slot` (0 for the caller) names the thread, so each keeps its own
    scratch. The caller never waits for an item nobody has started: on a
    busy machine it simply does them all itself. Raises what fn raised."""
    helpers = min(count - 1, helper_threads()) if xp is np else 0
    if helpers <= 0:
        for item in range(count):
            fn(item, 0)
        return
    pool = _executor(helpers)
    job = _Job(count, fn)
    with _one_blas_thread:
        for slot in range(1, helpers + 1):
            pool.submit(job.work, slot)
        job.work(0)
        job.finish()


class _OneBlasThread:
    """Context: the BLAS pool at one thread while any run_chunks is inside
    (OpenBLAS serves concurrent multi-threaded calls from its one pool, the
    later callers spinning until it is free), back to its size after the
    last one leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._before: int | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._before = set_blas_threads(1)
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                set_blas_threads(self._before)


_one_blas_thread = _OneBlasThread()


class _Job:
    """The items of one run_chunks and who is working on them."""

    def __init__(self, count: int, fn: Callable[[int, int], None]) -> None:
        self.count, self.fn = count, fn
        self.next = 0
        self.busy = 0
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def work(self, slot: int) -> None:
        while True:
            with self.cond:
                item = self.next
                if item >= self.count or self.error is not None:
                    return
                self.next += 1
                self.busy += 1
            try:
                self.fn(item, slot)
            except BaseException as exc:  # re-raised on the caller's thread
                with self.cond:
                    self.error = self.error or exc
            finally:
                with self.cond:
                    self.busy -= 1
                    self.cond.notify_all()

    def finish(self) -> None:
        """Wait for the items helpers started; raise the first error."""
        with self.cond:
            while self.busy:
                self.cond.wait()
            self.next = self.count  # a helper that starts late finds nothing to do
        if self.error is not None:
            raise self.error


_POOL: list[Any] = []  # [executor, pid, size] once made
_BLAS: list[Any] = []  # [threadpoolctl's controllers of the loaded BLAS], read once


def _executor(helpers: int) -> ThreadPoolExecutor:
    # A forked child inherits the executor object but not its threads.
    if not _POOL or _POOL[1] != os.getpid() or _POOL[2] < helpers:
        _POOL[:] = [ThreadPoolExecutor(helpers, thread_name_prefix="nn-chunks"),
                    os.getpid(), helpers]
    return _POOL[0]


def blas_threads() -> int | None:
    """Threads of the loaded BLAS's pool, None if threadpoolctl cannot tell."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # no threadpoolctl, or a BLAS it cannot read
            _BLAS.append([])
    counts = [lib.num_threads for lib in _BLAS[0]]
    return max(counts) if counts else None


def set_blas_threads(threads: int | None) -> int | None:
    """Resize the BLAS pool (None: leave it); return the size it had."""
    before = blas_threads()
    if threads is not None and before is not None and threads != before:
        for lib in _BLAS[0]:
            lib.set_num_threads(threads)
    return before


def helper_threads() -> int:
    """Threads to add to the caller's: the BLAS pool's size less one (so
    `psctl worker --threads-per-worker` sizes both), at most MAX_THREADS - 1;
    none when the pool's idle threads spin (blas_spins) or it cannot be read,
    and none while another thread's run_chunks holds it at one thread."""
    threads = blas_threads()
    if threads is None or threads < 2 or blas_spins():
        return 0
    return min(threads, MAX_THREADS) - 1


# OpenBLAS's idle pool threads busy-wait (sched_yield in a loop) for
# 2**OPENBLAS_THREAD_TIMEOUT cycles after each call, 2**28 (~0.1 s) unless
# that variable was set when numpy loaded: the spinning thread then takes a
# core from the helpers for the whole step (measured on the bench CNN: the
# process used twice the CPU, and the threads ran slower than one thread
# with BLAS's own). Helpers are used only when the wait is at most this.
QUIET_BLAS_TIMEOUT_LOG2 = 12
_SPINS: list[bool] = []


def blas_spins() -> bool:
    """Whether the loaded BLAS's idle pool threads busy-wait between calls
    (any BLAS but an OpenBLAS whose thread timeout is short is assumed to)."""
    if not _SPINS:
        blas_threads()
        spins = True
        for lib in _BLAS[0]:
            timeout = getattr(getattr(lib, "dynlib", None), "openblas_thread_timeout", None)
            if lib.internal_api == "openblas" and timeout is not None:
                timeout.restype = ctypes.c_int
                spins = not 0 < timeout() <= QUIET_BLAS_TIMEOUT_LOG2
        _SPINS.append(spins)
    return _SPINS[0]
