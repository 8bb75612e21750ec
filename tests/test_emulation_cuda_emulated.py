"""The CUDA emulator's own checks (tests/cuda_emulation/cuda_emulation.h, build.py), each shown
able to fail: misaligned ldmatrix rows, cp.async copies and vector __ldg loads are faults;
out-of-bounds global accesses hit a guard page after every buffer the routed backend passes;
the launchers' 64-bit index paths can be forced on small tensors."""
import ctypes
import subprocess
import sys
import textwrap

import pytest
import torch

from cuda_emulation import build
from op_checks import group_norm as group_norm_checks


@pytest.fixture(scope="module")
def checks():
    return build.build("checks")


def test_vector_ldg_needs_its_alignment(checks):
    x = torch.arange(1.0, 9.0)  # the CPU allocator aligns to 64 bytes
    assert checks.ldg_float4(x.data_ptr()) == 10.0
    assert checks.ldg_float4(x.data_ptr() + 16) == 26.0
    with pytest.raises(RuntimeError, match="__ldg of a 16-byte type from an address not aligned to 16 bytes"):
        checks.ldg_float4(x.data_ptr() + 4)


def test_ldmatrix_rows_need_16_byte_alignment(checks):
    regs = checks.ldmatrix(0)
    for lane in range(32):  # matrix 0, no .trans: row lane / 4, columns 2 (lane % 4) and the next
        first = (lane // 4) * 8 + 2 * (lane % 4)
        assert regs[lane] == first | ((first + 1) << 16)
    checks.ldmatrix(16)
    with pytest.raises(RuntimeError, match="ldmatrix row address not 16-byte aligned"):
        checks.ldmatrix(8)


@pytest.mark.parametrize("size", [4, 8, 16])
def test_cp_async_sizes_and_alignment(checks, size):
    src = torch.arange(64, dtype=torch.uint8)
    assert checks.cp_async(src.data_ptr() + size, size, size) == bytes(range(size, 2 * size))
    with pytest.raises(RuntimeError, match=f"cp.async of {size} bytes from/to an address not aligned"):
        checks.cp_async(src.data_ptr() + size // 2, size, 0)
    with pytest.raises(RuntimeError, match=f"cp.async of {size} bytes from/to an address not aligned"):
        checks.cp_async(src.data_ptr(), size, size // 2)


def test_cp_async_other_sizes_fault(checks):
    src = torch.arange(64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"cp.async of 12 bytes \(4, 8 or 16\)"):
        checks.cp_async(src.data_ptr(), 12, 0)


def test_guard_page_faults_an_overrun(checks):
    """An in-bounds read of a guarded buffer works; reading one element past its end kills the
    process with SIGSEGV (in a child process: the fault is not recoverable)."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(build.HERE.parent)!r})
        from cuda_emulation import build
        spec = importlib.util.spec_from_file_location("checks_emulated", {str(build.target("checks"))!r})
        checks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(checks)
        data = build.guarded_bytes(64 * 4)  # 64 floats, ending exactly at the guard page
        data.view(dtype=__import__("torch").float32).fill_(1.0)
        print("in bounds", checks.sum(data.data_ptr(), 64), flush=True)
        print("overrun", checks.sum(data.data_ptr(), int(sys.argv[1])), flush=True)
    """)
    ok = subprocess.run([sys.executable, "-c", script, "64"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "overrun 64.0" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", script, "65"], capture_output=True, text=True, timeout=120)
    assert "in bounds 64.0" in bad.stdout, bad.stderr[-2000:]
    assert bad.returncode == -11, (bad.returncode, bad.stdout, bad.stderr[-2000:])  # SIGSEGV


def test_routed_pointers_are_guarded_and_written_back(monkeypatch):
    """route_cuda_backend makes data_ptr() answer an address in a guarded copy; what a call
    writes there reaches the tensor, and the copy ends at the guard page."""
    emulated = build.build("group_norm")
    extension = build.route_cuda_backend(monkeypatch, emulated)
    t = torch.zeros(6, 10, dtype=torch.float32)  # 240 bytes: a multiple of 16, so no padding
    view = t[1:]
    address = view.data_ptr()
    assert (address + view.numel() * 4) % build._PAGE == 0  # the view ends with the storage
    ctypes.memmove(address, (ctypes.c_float * 2)(5.0, 7.0), 8)
    assert t[1, 0] == 0  # not yet: the write is in the guarded copy
    extension.guard.flush()
    assert t[1, 0] == 5.0 and t[1, 1] == 7.0 and t.sum() == 12.0


def test_force_int64_index_runs_the_64_bit_path(seed, monkeypatch):
    emulated = build.build("group_norm")
    extension = build.route_cuda_backend(monkeypatch, emulated)
    before = emulated.int64_index_launches()
    group_norm_checks.check("cuda", torch.float16, (2, 8, 5, 7), 4, "contiguous", True, True)
    assert emulated.int64_index_launches() == before  # small tensors: the 32-bit path
    emulated.set_force_int64_index(True)
    try:
        group_norm_checks.check("cuda", torch.float16, (2, 8, 5, 7), 4, "contiguous", True, True)
        group_norm_checks.check("cuda", torch.bfloat16, (1, 16, 9, 3), 8, "channels_last", False, True)
    finally:
        emulated.set_force_int64_index(False)
    assert emulated.int64_index_launches() >= before + 4  # forward and backward elementwise, twice
    assert extension.calls.get("group_norm_fwd_cuda", 0) >= 3 and extension.calls.get("group_norm_bwd_cuda", 0) >= 3
