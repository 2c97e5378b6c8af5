"""Server-side optimizers: update rules and learning-rate schedules, apart
from parameter storage (the shard owns the arrays, ps/table.py).

The shard owns the arrays and calls `optimizer.step(param, grad, state)` on
each slice it holds; the single-process reference trainer calls the same
math on whole tensors through `Updater`. Every rule is element-wise with
scalars computed once per call, so updating a tensor whole or slice by slice
gives the same bits, and large arrays are walked in cache-sized chunks with a
small per-thread scratch buffer instead of slice-sized temporaries.

All arithmetic is float32 on float32 arrays. The rules are PyTorch's
formulations (torch.optim.SGD / Adagrad / RMSprop / Adam), with weight decay
added to the gradient before the rule (coupled L2).

The `optimizer:` spec is protocol/jobspec.py's: `make_optimizer` normalizes
it there, defaults and rules alike. Clipping uses the global norm a worker
computes (worker/trainer.py `global_norm`) and sends with its push.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping

import numpy as np

from protocol.jobspec import normalize_section

# Elements per chunk: 64 Ki float32 = 256 KiB, so the chunks of the
# parameter, the gradient and the scratch buffers stay in L2 (adam's two
# state arrays spill to L3) while a rule makes its several passes over them.
# Measured on 4M elements: 32 Ki to 128 Ki are within noise of each other;
# 4 Ki to 8 Ki pay Python overhead per chunk (adam: ~13 ufunc calls each),
# and whole-array passes are slower again (every pass goes to DRAM).
CHUNK_ELEMS = 64 * 1024

# Optimizer state arrays per kind (besides adam's 0-d step counter "t").
_STATE_KEYS = {
    "sgd": (),
    "momentum": ("v",),
    "adagrad": ("sum",),
    "rmsprop": ("sq",),
    "adam": ("m", "v"),
}


# --- scratch -----------------------------------------------------------------

class _Scratch(threading.local):
    """Two chunk-sized float32 buffers per thread: the effective gradient and
    one temporary. Per thread so concurrent shards' jobs never share one."""

    def __init__(self) -> None:
        self.g = np.empty(CHUNK_ELEMS, np.float32)
        self.t = np.empty(CHUNK_ELEMS, np.float32)


_SCRATCH = _Scratch()


# --- the rules, one chunk at a time ---------------------------------------------
# Each takes the parameter chunk p (written in place), the effective gradient
# chunk g (never written: it may be a read-only network buffer), the state
# chunks, a scratch chunk t and the call's float32 constants k.

def _sgd(p, g, st, t, k):
    np.multiply(g, k[0], out=t)          # k = (-lr,)
    np.add(p, t, out=p)


def _sgd_unit(p, g, st, t, k):
    np.subtract(p, g, out=p)             # lr == 1: one pass, the same bits as _sgd


def _momentum(p, g, st, t, k):
    v, = st                              # k = (-lr, mu)
    np.multiply(v, k[1], out=v)
    np.add(v, g, out=v)                  # v = mu*v + g
    np.multiply(v, k[0], out=t)
    np.add(p, t, out=p)                  # p -= lr*v


def _nesterov(p, g, st, t, k):
    v, = st                              # k = (-lr, mu)
    np.multiply(v, k[1], out=v)
    np.add(v, g, out=v)                  # v = mu*v + g
    np.multiply(v, k[1], out=t)
    np.add(t, g, out=t)
    np.multiply(t, k[0], out=t)
    np.add(p, t, out=p)                  # p -= lr*(g + mu*v)


def _adagrad(p, g, st, t, k):
    acc, = st                            # k = (-lr, eps)
    np.multiply(g, g, out=t)
    np.add(acc, t, out=acc)              # sum += g*g
    np.sqrt(acc, out=t)
    np.add(t, k[1], out=t)
    np.divide(g, t, out=t)
    np.multiply(t, k[0], out=t)
    np.add(p, t, out=p)                  # p -= lr * g / (sqrt(sum) + eps)


def _rmsprop(p, g, st, t, k):
    sq, = st                             # k = (-lr, eps, rho, 1-rho)
    np.multiply(sq, k[2], out=sq)
    np.multiply(g, g, out=t)
    np.multiply(t, k[3], out=t)
    np.add(sq, t, out=sq)                # sq = rho*sq + (1-rho)*g*g
    np.sqrt(sq, out=t)
    np.add(t, k[1], out=t)
    np.divide(g, t, out=t)
    np.multiply(t, k[0], out=t)
    np.add(p, t, out=p)                  # p -= lr * g / (sqrt(sq) + eps)


def _adam(p, g, st, t, k):
    m, v = st                            # k = (-lr/bc1, eps, b1, 1-b1, b2, 1-b2, sqrt(bc2))
    np.multiply(m, k[2], out=m)
    np.multiply(g, k[3], out=t)
    np.add(m, t, out=m)                  # m = b1*m + (1-b1)*g
    np.multiply(v, k[4], out=v)
    np.multiply(g, g, out=t)
    np.multiply(t, k[5], out=t)
    np.add(v, t, out=v)                  # v = b2*v + (1-b2)*g*g
    np.sqrt(v, out=t)
    np.divide(t, k[6], out=t)
    np.add(t, k[1], out=t)               # denom = sqrt(v)/sqrt(bc2) + eps
    np.divide(m, t, out=t)
    np.multiply(t, k[0], out=t)
    np.add(p, t, out=p)                  # p -= lr/bc1 * m / denom


def _flat(a: np.ndarray, what: str, size: int, *, write: bool) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise TypeError(f"{what}: expected a float32 numpy array, found "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if a.size != size:
        raise ValueError(f"{what}: expected {size} elements, found {a.size}")
    if write and not (a.flags.c_contiguous and a.flags.writeable):
        raise ValueError(f"{what}: expected a writeable C-contiguous array")
    return a.reshape(-1)  # a view; for a non-contiguous read-only input, a copy


class Optimizer:
    """One job's update rule and learning-rate schedule (stateless itself:
    the per-slice state lives beside each slice, from `init_state`)."""

    def __init__(self, spec: Mapping | None = None):
        self.spec = normalize_section("optimizer", spec)
        s = self.spec
        self.kind = s["kind"]
        self._state_keys = _STATE_KEYS[self.kind]
        self._rule = {"sgd": _sgd, "momentum": _nesterov if s["nesterov"] else _momentum,
                      "adagrad": _adagrad, "rmsprop": _rmsprop, "adam": _adam}[self.kind]
        f32 = np.float32
        self._wd = f32(s["weight_decay"])
        self._decayed = bool(self._wd != 0)
        self._eps = f32(s["eps"])
        self._mu = f32(s["momentum"])
        self._rho = (f32(s["rho"]), f32(1.0 - s["rho"]))
        self._b = (f32(s["beta1"]), f32(1.0 - s["beta1"]), f32(s["beta2"]), f32(1.0 - s["beta2"]))

    def __repr__(self) -> str:
        return f"Optimizer({self.spec!r})"

    @property
    def state_copies(self) -> int:
        """Arrays of a parameter's size this optimizer keeps beside it (adam 2, momentum 1, sgd 0)."""
        return len(self._state_keys)

    def init_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """Fresh state for one parameter (or slice): zeros shaped like it, and
        for adam the 0-d int64 count `t` of updates applied to this state.

        Written now, not left to calloc: untouched zeros would fault their pages
        in during the first update, which would then take several times as
        long as the next ones (a table is created once, and off the data path)."""
        state = {}
        for key in self._state_keys:
            arr = state[key] = np.empty(param.shape, np.float32)
            arr.fill(0.0)
        if self.kind == "adam":
            state["t"] = np.zeros((), np.int64)
        return state

    def lr_at(self, step: int) -> float:
        """The learning rate for global step `step` (negative reads as 0):
        the schedule, times the linear warm-up factor."""
        sched = self.spec["schedule"]
        lr = self.spec["lr"]
        step = max(0, int(step))
        if sched["kind"] == "step":
            lr = lr * sched["gamma"] ** (step // sched["step_size"])
        elif sched["kind"] == "cosine" and sched["total_steps"] > 0:
            total = sched["total_steps"]
            lo = sched["min_lr"]
            lr = lo + (lr - lo) * (1.0 + math.cos(math.pi * min(step, total) / total)) / 2.0
        if sched["warmup_steps"] > 0:
            lr *= min(1.0, (step + 1) / sched["warmup_steps"])
        return lr

    def clip_scale(self, norm: float) -> float:
        """Factor for a gradient whose global norm is `norm` (< 0: unknown):
        min(1, clip_norm / norm) when clipping is on, else 1."""
        clip = self.spec["clip_norm"]
        if clip > 0 and norm > clip:
            return clip / norm
        return 1.0

    def staleness_scale(self, staleness: int) -> float:
        """lr_scale for a push `staleness` versions old: 1/max(1, staleness)
        when `staleness_aware` is set (Zhang et al. 2016), else 1."""
        if self.spec["staleness_aware"] and staleness > 1:
            return 1.0 / staleness
        return 1.0

    def _consts(self, state: dict, lr: float) -> tuple:
        kind = self.kind
        if kind == "sgd":
            return (np.float32(-lr),)
        if kind == "momentum":
            return (np.float32(-lr), self._mu)
        if kind == "adagrad":
            return (np.float32(-lr), self._eps)
        if kind == "rmsprop":
            return (np.float32(-lr), self._eps) + self._rho
        t = int(state["t"]) + 1
        state["t"][()] = t
        bc1 = 1.0 - self.spec["beta1"] ** t
        bc2 = 1.0 - self.spec["beta2"] ** t
        return (np.float32(-lr / bc1), self._eps) + self._b + (np.float32(math.sqrt(bc2)),)

    def step(self, param: np.ndarray, grad: np.ndarray, state: dict, *, step: int,
             grad_scale: float = 1.0, lr_scale: float = 1.0) -> None:
        """Apply one update to `param` and `state` in place.

        g = grad * grad_scale + weight_decay * param, then the kind's rule at
        learning rate lr_at(step) * lr_scale. `grad` is only read (it may be a
        read-only view of a received frame). Raises TypeError for arrays that
        are not float32 and ValueError for mismatched sizes or a `param` that
        is not a writeable C-contiguous array.
        """
        n = param.size
        p = _flat(param, "param", n, write=True)
        g = _flat(grad, "grad", n, write=False)
        st = tuple(_flat(state[key], f"state[{key!r}]", n, write=True) for key in self._state_keys)
        lr = self.lr_at(step) * lr_scale
        k = self._consts(state, lr)
        gs = np.float32(grad_scale)
        wd = self._wd
        # Python floats first: numpy scalar comparisons cost a microsecond each.
        scaled = grad_scale != 1.0 and bool(gs != 1)
        decayed = self._decayed
        rule = _sgd_unit if self._rule is _sgd and (lr == 1.0 or k[0] == -1) else self._rule
        scratch = _SCRATCH
        if n <= CHUNK_ELEMS and not (scaled or decayed):
            rule(p, g, st, scratch.t[:n], k)  # one chunk, nothing to scale: the same bits
            return
        for lo in range(0, n, CHUNK_ELEMS):
            hi = min(lo + CHUNK_ELEMS, n)
            pc = p[lo:hi]
            gc = g[lo:hi]
            t = scratch.t[:hi - lo]
            if scaled or decayed:
                ge = scratch.g[:hi - lo]
                if scaled:
                    np.multiply(gc, gs, out=ge)
                    gc = ge
                if decayed:
                    np.multiply(pc, wd, out=t)
                    np.add(gc, t, out=ge)
                    gc = ge
            rule(pc, gc, [a[lo:hi] for a in st] if st else st, t, k)


def make_optimizer(spec: Mapping | None) -> Optimizer:
    """Build the optimizer of an `optimizer:` spec, normalized by
    protocol/jobspec.py (partial specs get the job file's defaults and
    rules). Raises SpecError, a ValueError, with one sentence naming a bad field."""
    return Optimizer(spec)


class Updater:
    """The reference trainer's server: one optimizer state per learned tensor,
    updated whole with the same math a shard applies per slice.

    Tensors named in `nonlearned` (BatchNorm running statistics) take their
    "gradient" as a delta: params[n] += grads[n], no optimizer, no decay.
    """

    def __init__(self, optimizer: Optimizer, params: Mapping[str, np.ndarray], *,
                 nonlearned: Iterable[str] = ()):
        self.optimizer = optimizer
        self.nonlearned = frozenset(nonlearned)
        self.state = {name: optimizer.init_state(p) for name, p in params.items()
                      if name not in self.nonlearned}

    def apply(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], *,
              step: int, norm: float = -1.0, lr_scale: float = 1.0) -> None:
        """Update every tensor named in `grads` in place. `norm` is the global
        norm of the learned gradients (-1: unknown, no clipping)."""
        scale = self.optimizer.clip_scale(norm)
        for name, grad in grads.items():
            if name in self.nonlearned:
                np.add(params[name], grad, out=params[name])
            else:
                self.optimizer.step(params[name], grad, self.state[name], step=step,
                                    grad_scale=scale, lr_scale=lr_scale)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every state array as "name/key" -> array (for np.savez)."""
        return {f"{name}/{key}": a for name, st in self.state.items() for key, a in st.items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what `state_arrays` returned (copied into the live state).
        Raises KeyError when an array the state needs is missing."""
        for name, st in self.state.items():
            for key, a in st.items():
                a[...] = arrays[f"{name}/{key}"]
