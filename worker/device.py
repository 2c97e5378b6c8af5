"""Device choice for a worker: numpy on the CPU or cupy on a CUDA GPU.

The backprop library is written against an array module `xp`; this module
picks it once per worker (`--device cpu|gpu|auto`). cupy is imported only
inside `select_device`, and only when a GPU is asked for, so a CPU install
never needs it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger("pscluster.worker")

DEVICE_NAMES = ("cpu", "gpu", "auto")

_GPU_NEEDS = "--device gpu needs cupy and a CUDA GPU"


class DeviceError(RuntimeError):
    """The asked-for device cannot be used; the message is one sentence."""


@dataclass(frozen=True)
class Device:
    """An array module and the moves between it and host memory."""

    name: str  # "cpu" or "gpu"
    xp: ModuleType  # numpy or cupy

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def to_device(self, array: Any) -> Any:
        """Return `array` as an array of this device (no copy when it already is one)."""
        return self.xp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        """Return `array` as a numpy array (blocks until a GPU copy is done)."""
        if self.is_gpu:
            return self.xp.asnumpy(array)
        return np.asarray(array)

    def synchronize(self) -> None:
        """Wait until all queued device work is done (a no-op on the CPU)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


CPU = Device("cpu", np)


def _select_gpu() -> Device:
    try:
        import cupy  # lazy on purpose: CPU installs lack it
    except ImportError:
        raise DeviceError(
            f"{_GPU_NEEDS}: cupy is not installed (pip install 'pscluster[gpu]')."
        ) from None
    except Exception as exc:  # a broken CUDA install fails while importing
        raise DeviceError(f"{_GPU_NEEDS}: importing cupy failed ({exc}).") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            raise DeviceError(f"{_GPU_NEEDS}: cupy found no CUDA GPU on this machine.")
        # A tiny allocation and kernel: a driver or toolkit mismatch shows here,
        # not in the middle of the first training step.
        probe = cupy.arange(4, dtype=cupy.float32)
        float((probe * probe).sum())
    except DeviceError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DeviceError(f"{_GPU_NEEDS}: no usable CUDA GPU was found ({reason}).") from exc
    return Device("gpu", cupy)


def select_device(name: str) -> Device:
    """Return the Device for "cpu", "gpu" or "auto".

    "gpu" raises DeviceError (one sentence) when cupy or a usable GPU is
    missing; "auto" then falls back to the CPU and logs why on
    "pscluster.worker". An unknown name raises ValueError.
    """
    if name == "cpu":
        return CPU
    if name == "gpu":
        return _select_gpu()
    if name == "auto":
        try:
            device = _select_gpu()
        except DeviceError as exc:
            log.info("device auto: using the CPU (numpy) because %s", _reason(exc))
            return CPU
        log.info("device auto: using the GPU (cupy)")
        return device
    raise ValueError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_NAMES)}")


def _reason(exc: DeviceError) -> str:
    text = str(exc)
    head = f"{_GPU_NEEDS}: "
    return text[len(head):].rstrip(".") if text.startswith(head) else text


def array_module(array: Any) -> ModuleType:
    """Return numpy or cupy, whichever owns `array` (numpy for anything else)."""
    if type(array).__module__.startswith("cupy"):
        import cupy  # only reached with a cupy array in hand

        return cupy
    return np
