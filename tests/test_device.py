"""Device choice: the CPU path, the `gpu` error sentence, auto's fallback.

cupy is hidden or faked through sys.modules, so these run the same on a
machine with or without cupy and a GPU.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import types

import numpy as np
import pytest

from worker.device import Device, DeviceError, select_device


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError


@pytest.fixture
def cupy_without_gpu(monkeypatch):
    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count():
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=get_device_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)


def test_cpu():
    device = select_device("cpu")
    assert isinstance(device, Device)
    assert device.name == "cpu" and device.xp is np and not device.is_gpu
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    on = device.to_device(a)
    assert isinstance(on, np.ndarray) and np.array_equal(on, a)
    back = device.to_host(on)
    assert isinstance(back, np.ndarray) and np.array_equal(back, a)
    assert isinstance(device.to_host([1, 2]), np.ndarray)
    device.synchronize()


def test_gpu_without_cupy_is_one_clear_sentence(no_cupy):
    with pytest.raises(DeviceError) as info:
        select_device("gpu")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert message == (
        "--device gpu needs cupy and a CUDA GPU: cupy is not installed "
        "(pip install 'pscluster[gpu]')."
    )


def test_gpu_with_cupy_but_no_gpu(cupy_without_gpu):
    with pytest.raises(DeviceError, match="no usable CUDA GPU was found .*cudaErrorNoDevice"):
        select_device("gpu")


@pytest.mark.parametrize("fixture", ["no_cupy", "cupy_without_gpu"])
def test_auto_falls_back_to_cpu_and_says_why(fixture, request, caplog):
    request.getfixturevalue(fixture)
    with caplog.at_level(logging.INFO, logger="pscluster.worker"):
        device = select_device("auto")
    assert device.name == "cpu" and device.xp is np
    records = [r for r in caplog.records if r.name == "pscluster.worker"]
    assert len(records) == 1 and records[0].levelno >= logging.INFO
    text = records[0].getMessage()
    assert "using the CPU" in text
    assert ("not installed" in text) if fixture == "no_cupy" else ("no usable CUDA GPU" in text)


def test_unknown_name():
    with pytest.raises(ValueError, match="cpu, gpu, auto"):
        select_device("tpu")


def test_cpu_install_never_imports_cupy():
    code = (
        "import sys\n"
        "from worker.device import select_device\n"
        "import worker.nn, worker.bench.nn\n"
        "from worker.nn import build_model\n"
        "m = build_model({'kind': 'cnn'}, (1, 8, 8), 3, xp=select_device('cpu').xp)\n"
        "import numpy as np\n"
        "m.train_step(np.zeros((2, 1, 8, 8)), np.zeros(2, int))\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
