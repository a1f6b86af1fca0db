import pytest
import torch

import sdkernels
from sdkernels import backends


def test_backend_info_lists_every_backend():
    info = sdkernels.backend_info()
    assert set(info.available) == {"extension", "triton", "reference"}
    assert info.available["reference"]["cpu"] == ""
    assert info.active["cpu"] in backends.BACKENDS
    text = str(info)
    for name in ("extension", "triton", "reference", "runs now", "torch"):
        assert name in text


def test_use_backend_reference_and_restore():
    x = torch.rand(2, 3, 4, 4)
    with sdkernels.use_backend("reference"):
        assert backends.resolve_backend(x.device) == "reference"
        assert sdkernels.backend_info().forced == "reference"
    assert sdkernels.backend_info().forced is None


def test_unknown_and_unavailable_backends_are_clear_errors():
    with pytest.raises(ValueError, match="unknown sdkernels backend"):
        with sdkernels.use_backend("cudnn"):
            pass
    if not any(backends._status("triton", d)[0] for d in ("cpu", "cuda")):
        with pytest.raises(sdkernels.BackendUnavailableError, match="triton"):
            with sdkernels.use_backend("triton"):
                pass
    if not sdkernels.ops.extension.is_available():
        with pytest.raises(sdkernels.BackendUnavailableError, match="extension"):
            with sdkernels.use_backend("extension"):
                pass


def test_forced_backend_on_unsupported_device_raises():
    if not sdkernels.ops.extension.is_available() or sdkernels.ops.extension.built_with_cuda():
        pytest.skip("needs a CPU-only build of the extension")
    with sdkernels.use_backend("extension"):
        with pytest.raises(sdkernels.BackendUnavailableError, match="cuda"):
            backends.resolve_backend(torch.device("cuda"))


def test_extension_is_default_on_cpu_when_built():
    if not sdkernels.ops.extension.is_available():
        pytest.skip("extension not built")
    assert sdkernels.backend_info().active["cpu"] == "extension"


def test_extension_loaded_when_required():
    # CI sets this: a build that silently fell back to the reference ops must not pass.
    import os
    if os.environ.get("SDKERNELS_REQUIRE_EXTENSION") != "1":
        pytest.skip("SDKERNELS_REQUIRE_EXTENSION not set")
    ext = sdkernels.ops.extension
    assert ext.is_available(), ext.unavailable_reason()


def test_triton_backend_status_says_why(monkeypatch):
    # On CPU the Triton kernels run only under the interpreter.
    monkeypatch.setattr(backends, "_status_cache", {})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = backends._status("triton", "cpu")
    assert not ok and why
    monkeypatch.setattr(backends, "_status_cache", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = backends._status("triton", "cpu")
    try:
        import triton  # noqa: F401
    except ImportError:
        assert not ok and "triton" in why
        return
    assert ok == sdkernels.ops.extension.is_available(), why


def test_triton_never_chosen_automatically():
    assert sdkernels.backend_info().active["cpu"] != "triton"


def test_cuda_default_is_module_path_until_measured(recwarn):
    # Issue 13 part 6: no recorded GPU run shows the fused CUDA paths at least as fast as
    # the module path, so a CUDA tensor takes the module path (real skipping) by default,
    # without a fallback warning, and backend_info says why.
    assert backends._choose("cuda") == "reference"
    assert not [w for w in recwarn if "sdkernels" in str(w.message)]
    why = backends.auto_reason("cuda")
    assert "not yet measured on a GPU" in why and "use_backend('extension')" in why
    info = sdkernels.backend_info()
    assert info.reasons["cuda"] == why
    assert "automatic choice on cuda: fused CUDA paths not yet measured" in str(info)
    # CPU keeps the extension default (measured on CPU)
    if sdkernels.ops.extension.is_available():
        assert backends._choose("cpu") == "extension"
        assert backends.auto_reason("cpu") == ""
