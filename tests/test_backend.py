"""The backend registry: auto choice, FLASHLOSS_BACKEND, clear errors, the missing-native path."""
import subprocess
import sys

import pytest
import torch

import flashloss
from flashloss import _backend, _native
from flashloss._backend import BackendUnavailableError, backend_available, resolve


def test_auto_picks_the_native_cpu_kernels_on_cpu():
    assert resolve("row_logsumexp", "auto", "cpu") == "cpu"
    assert resolve("row_logsumexp", None, "cpu") == "cpu"


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("FLASHLOSS_BACKEND", "torch")
    assert resolve("row_logsumexp", "auto", "cpu") == "torch"
    # an explicit argument wins over the environment
    assert resolve("row_logsumexp", "cpu", "cpu") == "cpu"


def test_env_with_unknown_name_names_the_variable(monkeypatch):
    monkeypatch.setenv("FLASHLOSS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FLASHLOSS_BACKEND must be one of"):
        flashloss.row_logsumexp(torch.randn(2, 3))


def test_env_naming_an_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("FLASHLOSS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="FLASHLOSS_BACKEND"):
        flashloss.row_logsumexp(torch.randn(2, 3))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = backend_available("triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_available("triton", "cpu")[0]


def test_cuda_backend_reason_is_the_truth():
    ok, why = backend_available("cuda", "cpu")
    assert not ok
    if not _native.compiled_with_cuda():
        assert "without CUDA kernels" in why


def test_missing_native_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(_native, "_loaded", False)
    monkeypatch.setattr(_native, "_error", "ImportError: planted")
    ok, why = backend_available("cpu", "cpu")
    assert not ok and "planted" in why and "make install" in why
    assert resolve("row_logsumexp", "auto", "cpu") == "torch"
    with pytest.raises(BackendUnavailableError, match="planted"):
        flashloss.row_logsumexp(torch.randn(2, 3), backend="cpu")


def test_import_without_native_extension_warns_once_and_works():
    code = (
        "import sys, warnings\n"
        "sys.modules['flashloss._C'] = None  # makes `import flashloss._C` fail\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import flashloss, torch\n"
        "    import flashloss._backend as b\n"
        "    b.backend_available('cpu', 'cpu')\n"
        "    out = flashloss.row_logsumexp(torch.zeros(2, 4))\n"
        "msgs = [str(x.message) for x in w if 'flashloss._C' in str(x.message)]\n"
        "print(len(msgs), round(out[0].item(), 4), msgs[0][:60])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, value, msg = res.stdout.split(" ", 2)
    assert count == "1", res.stdout
    assert float(value) == pytest.approx(1.3863, abs=1e-4)  # log 4
    assert "native extension" in msg


def test_register_op_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backends"):
        _backend.register_op("bogus", {"tpu": None}, {})
