"""Backend dispatch, fallbacks and the native extension."""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import genfast
from genfast import _dispatch, _ext
from genfast._dispatch import BackendWarning, OpDispatcher
from genfast.ops import bias_act
from genfast.ops.bias_act import DISPATCH



def test_automatic_choice_on_cpu_is_the_native_kernel():
    x = torch.randn(4, 3)
    assert DISPATCH.select(None, x.device, torch.float32) == "cpu"
    # bfloat16 and float64 are native too
    assert DISPATCH.select(None, x.device, torch.bfloat16) == "cpu"
    assert DISPATCH.select(None, x.device, torch.float64) == "cpu"


def test_environment_variable_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("GENFAST_BACKEND", "reference")
    _dispatch.refresh_environment()
    assert DISPATCH.select(None, cpu, torch.float32) == "reference"
    monkeypatch.setenv("GENFAST_BACKEND", "attention=triton,bias_act=reference")
    _dispatch.refresh_environment()
    assert DISPATCH.select(None, cpu, torch.float32) == "reference"
    monkeypatch.setenv("GENFAST_BACKEND", "attention=triton")
    _dispatch.refresh_environment()
    assert DISPATCH.select(None, cpu, torch.float32) == "cpu"
    monkeypatch.setenv("GENFAST_BACKEND", "bias_act=trtion")
    _dispatch.refresh_environment()
    with pytest.raises(ValueError, match="GENFAST_BACKEND asks bias_act for backend 'trtion'"):
        DISPATCH.select(None, cpu, torch.float32)
    # the per-call argument wins over the environment
    monkeypatch.setenv("GENFAST_BACKEND", "reference")
    _dispatch.refresh_environment()
    assert DISPATCH.select("cpu", cpu, torch.float32) == "cpu"


def test_autotune_setting(monkeypatch):
    """GENFAST_AUTOTUNE=quick|full; another value warns (importing genfast must not fail) and
    means full."""
    for value, quick in (("quick", True), (" QUICK ", True), ("full", False), ("", False)):
        monkeypatch.setenv("GENFAST_AUTOTUNE", value)
        assert _dispatch.refresh_environment().quick_autotune is quick
    monkeypatch.setenv("GENFAST_AUTOTUNE", "fast")
    with pytest.warns(UserWarning, match="GENFAST_AUTOTUNE must be 'full' or 'quick', got 'fast'"):
        assert _dispatch.refresh_environment().quick_autotune is False


def _fresh_warnings(monkeypatch):
    monkeypatch.delenv("GENFAST_STRICT", raising=False)
    _dispatch.refresh_environment()
    monkeypatch.setattr(_dispatch, "_warned", set())


def test_unavailable_backend_falls_back_with_one_warning(monkeypatch):
    _fresh_warnings(monkeypatch)
    x = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = bias_act(x, act="tanh", backend="cuda")
        y2 = bias_act(x, act="tanh", backend="cuda")
    relevant = [w for w in caught if issubclass(w.category, BackendWarning)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert "backend 'cuda' cannot run here" in str(relevant[0].message)
    torch.testing.assert_close(y1, torch.tanh(x))
    torch.testing.assert_close(y2, torch.tanh(x))


def test_strict_mode_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("GENFAST_STRICT", "1")
    _dispatch.refresh_environment()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        bias_act(torch.randn(2, 3), backend="cuda")


def test_broken_backend_is_skipped_after_one_warning(monkeypatch):
    _fresh_warnings(monkeypatch)
    calls = []

    def broken(x):
        calls.append("cpu")
        raise RuntimeError("kernel exploded")

    def reference(x):
        calls.append("reference")
        return x + 1

    op = OpDispatcher("toy")
    op.register("cpu", [torch.float32], broken)
    op.register("reference", [torch.float32], reference)
    x = torch.zeros(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(op.run(None, x.device, x.dtype, x), x + 1)
    assert calls == ["cpu", "reference", "reference", "reference"]  # not retried once broken
    assert len([w for w in caught if "kernel exploded" in str(w.message)]) == 1
    monkeypatch.setenv("GENFAST_STRICT", "1")
    _dispatch.refresh_environment()
    op.broken.clear()
    with pytest.raises(RuntimeError, match="kernel exploded"):
        op.run(None, x.device, x.dtype, x)


def test_argument_errors_are_not_mistaken_for_a_broken_backend(monkeypatch):
    _fresh_warnings(monkeypatch)
    op = OpDispatcher("toy")
    op.register("cpu", [torch.float32], lambda x: (_ for _ in ()).throw(ValueError("bad x")))
    op.register("reference", [torch.float32], lambda x: x)
    with pytest.raises(ValueError, match="bad x"):
        op.run(None, torch.device("cpu"), torch.float32, torch.zeros(1))


def test_unsupported_call_moves_on_without_marking_the_backend_broken(monkeypatch):
    """A backend that lacks a feature of this call raises Unsupported: the next backend runs,
    even under GENFAST_STRICT, and the backend stays usable for other calls."""
    from genfast._dispatch import Unsupported

    _fresh_warnings(monkeypatch)
    monkeypatch.setenv("GENFAST_STRICT", "1")
    _dispatch.refresh_environment()

    def partial(x, feature):
        if feature:
            raise Unsupported("feature not implemented here")
        return x + 2

    op = OpDispatcher("toy")
    op.register("cpu", [torch.float32], partial)
    op.register("reference", [torch.float32], lambda x, feature: x + 1)
    x = torch.zeros(2)
    torch.testing.assert_close(op.run(None, x.device, x.dtype, x, True), x + 1)
    torch.testing.assert_close(op.run(None, x.device, x.dtype, x, False), x + 2)
    assert not op.broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op.run("cpu", x.device, x.dtype, x, True)
    assert any("does not support" in str(w.message) for w in caught)
    only = OpDispatcher("toy")
    only.register("cpu", [torch.float32], partial)
    with pytest.raises(RuntimeError, match="no backend supports"):
        only.run(None, x.device, x.dtype, x, True)


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        OpDispatcher("toy").register("tpu", [torch.float32], lambda x: x)


def test_info_reports_every_backend(capsys):
    report = genfast.info()
    out = capsys.readouterr().out
    assert f"genfast {genfast.__version__}" in out and "torch" in out
    assert set(report["backends"]) == set(genfast.BACKENDS)
    assert report["backends"]["reference"]["available"]
    assert report["backends"]["cpu"]["available"], report["backends"]["cpu"]["detail"]
    if not torch.cuda.is_available():
        assert not report["backends"]["cuda"]["available"]
        assert "GPU" in report["backends"]["cuda"]["detail"] or "CUDA" in report["backends"]["cuda"]["detail"]


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "genfast", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends" in out and "reference" in out


def test_import_without_the_extension_falls_back_to_reference():
    """A missing or broken extension: import works, info says why, ops warn once and run."""
    code = (
        "import sys, warnings; sys.modules['genfast._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "import torch, genfast\n"
        "genfast.info()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3): y = genfast.ops.bias_act(torch.ones(2, 3), act='relu')\n"
        "print('WARNINGS', len([m for m in w if 'native cpu kernels unavailable' in str(m.message)]))\n"
        "print('RESULT', y.sum().item())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GENFAST_STRICT", "GENFAST_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert "extension genfast._C: not loaded" in out
    assert "WARNINGS 1" in out
    assert f"RESULT {6 * 2 ** 0.5}"[:12] in out


def test_cuda_kernels_were_compiled_when_nvcc_is_present():
    """CI has nvcc but no GPU: the CUDA sources must still compile into the extension."""
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("no nvcc on this machine")
    info = _ext.build_info()
    assert info["cuda"], "nvcc is installed but genfast._C was built without CUDA kernels"
    assert info["cuda_archs"], "no CUDA architectures recorded"
    assert info["cuda_runtime_version"] >= 11000


def test_extension_rejects_bad_sizes_instead_of_crashing():
    options = _ext._C.BiasActOptions(mode="forward", act="linear", dim=0, alpha=0.0, gain=1.0, clamp=-1.0)
    with pytest.raises(ValueError, match="bias_act_cpu: out must have the shape of x"):
        _ext._C.bias_act_cpu(torch.empty(3), torch.randn(10), b=None, dy=None, ddx=None, db=None, options=options,
                             num_threads=1)


def test_use_backend_context_picks_the_backend_and_restores_it():
    import genfast
    from genfast.ops.bias_act import DISPATCH

    x = torch.randn(3, 4)
    assert DISPATCH._usable(None, x.device, x.dtype)[0] == "cpu"
    with genfast.use_backend("reference"):
        assert DISPATCH._usable(None, x.device, x.dtype)[0] == "reference"
        with genfast.use_backend({"bias_act": "cpu", "other_op": "reference"}):
            assert DISPATCH._usable(None, x.device, x.dtype)[0] == "cpu"
        assert DISPATCH._usable(None, x.device, x.dtype)[0] == "reference"
        # An explicit backend= still wins over the context.
        assert DISPATCH._usable("cpu", x.device, x.dtype)[0] == "cpu"
    assert DISPATCH._usable(None, x.device, x.dtype)[0] == "cpu"
    with pytest.raises(ValueError, match="unknown backend"):
        with genfast.use_backend("gpu"):
            pass


def test_attention_prefers_triton_forward_and_backward_on_hopper(monkeypatch):
    """sm_90: Triton first for the attention forward/backward (wgmma), CUDA first on sm_80 and for
    decode; checked without a GPU by pretending the backends can run on a given capability."""
    from genfast.ops import attention

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_ext, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(_dispatch, "backend_unavailable_reason", lambda name, device: None)
    for table in (attention.FORWARD, attention.BACKWARD, attention.DECODE):
        monkeypatch.setattr(table, "plans", {})
    for capability, first in (((9, 0), "triton"), ((8, 0), "cuda"), ((10, 0), "triton")):
        monkeypatch.setattr(attention, "_cuda_device_info", lambda index, c=capability: (c, 132))
        for table in (attention.FORWARD, attention.BACKWARD, attention.DECODE):
            table.plans.clear()
        assert attention.FORWARD.candidates(None, cuda, torch.bfloat16)[0] == first
        assert attention.BACKWARD.candidates(None, cuda, torch.bfloat16)[0] == first
        assert attention.DECODE.candidates(None, cuda, torch.bfloat16)[0] == "cuda"
        # an explicit request still wins
        assert attention.FORWARD.candidates("cuda", cuda, torch.bfloat16)[0] == "cuda"
