"""compile-check (genfast/compile_check.py): the launch grids of the Triton launchers at extreme
shapes stay within CUDA's axis limits, and a time-bounded subset of every family compiles for
sm_80 and sm_90 (bf16, fp16, fp32) with no failure and no config over shared memory.

Both run in a fresh process without TRITON_INTERPRET (conftest sets it; the launchers choose
interpreter tiles under it) on meta tensors: nothing is allocated and no GPU is needed."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")


def _python(code_or_args, timeout):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    argv = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else [sys.executable, *code_or_args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


GRID_SCRIPT = r'''
import json, torch
from genfast import compile_check as cc
from genfast.ops.filtered_lrelu import forward_plan
from genfast.ops.group_norm import Geometry
from genfast.triton_kernels import attention as A, filtered_lrelu as F, group_norm as G

def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")

cases = {}
def record(name, call):
    rec = cc._Recorder(max_autotune_configs=None)
    with rec.active():
        call()
    cases[name] = [[fn.__name__, list(grid)] for fn, _, _, grid in rec.launches]

# batch 2048 x 32 heads = 65,536 (batch x head) programs: over axis y's 65,535.
B, H, S, D = 2048, 32, 256, 64
q = meta(B, H, S, D)
lse = meta(B, H, S, dtype=torch.float32)
record("attention forward", lambda: A.forward(q, q, q, scale=0.125, window_right=0, dropout_p=0.1,
                                              return_dropout_mask=True))
record("attention backward", lambda: A.backward(q, q, q, q, q, lse, scale=0.125, deterministic=False))
record("attention backward deterministic", lambda: A.backward(q, q, q, q, q, lse, scale=0.125, deterministic=True))
record("attention decode", lambda: A.decode(meta(B, H, 1, D), q, q, meta(B, dtype=torch.int32), scale=0.125))
# a 2048 x 4096 NHWC image: H x W > 4.19M, so more than 65,535 spatial chunks
S = 2048 * 4096
geo = Geometry(1, 128, S, 32, True)
x, w, stats = meta(1, 128, S), meta(128), meta(1, 32, dtype=torch.float32)
record("group_norm nhwc forward", lambda: G.forward(x, w, w, x, stats, stats, geo, 1e-5, True))
record("group_norm nhwc backward", lambda: G.backward(x, x, stats, stats, w, w, x, w, w, geo, True))
# N x C = 128 x 1024 planes
f = meta(12, dtype=torch.float32)
plan = forward_plan(36, 36, f, f, 2, 2, (11, 10, 11, 10))
record("filtered_lrelu", lambda: F.filtered_lrelu(0, meta(128, 1024, plan.oh, plan.ow), None, meta(128, 1024, 36, 36),
                                                  None, f, f, plan, 1.4, 0.2, -1.0))
print(json.dumps(cases))
'''

EXPECTED_KERNELS = {
    "attention forward": {"_fwd_kernel", "_dropout_mask_kernel"},
    "attention backward": {"_bwd_preprocess_kernel", "_bwd_dkdv_kernel"},
    "attention backward deterministic": {"_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"},
    "attention decode": {"_decode_split_kernel", "_decode_combine_kernel"},
    "group_norm nhwc forward": {"_partial_moments", "_finalize", "_normalize"},
    "group_norm nhwc backward": {"_partial_grad_sums", "_grad_input"},
    "filtered_lrelu": {"_filtered_lrelu_kernel"},
}


def test_launch_grids_within_cuda_limits_at_extreme_shapes():
    from genfast.compile_check import GRID_LIMITS, grid_problems

    run = _python(GRID_SCRIPT, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    cases = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(cases) == set(EXPECTED_KERNELS)
    for name, launches in cases.items():
        assert {kernel for kernel, _ in launches} == EXPECTED_KERNELS[name], name
        for kernel, grid in launches:
            assert grid_problems(tuple(grid)) == [], (name, kernel, grid)
            assert all(0 < g <= limit for g, limit in zip(grid, GRID_LIMITS)), (name, kernel, grid)
    # The shapes are extreme indeed: the big counts are in the grids (not, say, clamped away).
    programs = {kernel: grid[0] for name, launches in cases.items() for kernel, grid in launches}
    assert programs["_fwd_kernel"] >= 2048 * 32 and programs["_bwd_dkdv_kernel"] >= 2048 * 8
    assert programs["_decode_split_kernel"] >= 2048 * 32 // 16
    assert programs["_normalize"] > 65535 and programs["_filtered_lrelu_kernel"] >= 128 * 1024


_SUMMARY = re.compile(r"compile-check: (\d+) configs, (\d+) failed, (\d+) spilling, (\d+) over shared memory")


@pytest.mark.parametrize("arch, dtypes", [("90", "bf16,fp32"), ("80", "fp16,fp32")])
def test_compile_check_subset(arch, dtypes):
    """Every family, one config per kernel and dtype (the first of the launcher's pruned list):
    sm_90 with bf16 and fp32, sm_80 with fp16 and fp32 (about a minute each on a free core);
    no half-precision config may spill."""
    run = _python(["-m", "genfast", "compile-check", "--quick", "--limit", "1", "--arch", arch, "--dtypes", dtypes,
                   "--no-cuda"], timeout=900)
    summary = _SUMMARY.search(run.stdout)
    assert summary, run.stdout[-3000:] + run.stderr[-3000:]
    configs, failed, _spilling, over = map(int, summary.groups())
    assert failed == 0 and over == 0, run.stdout[-6000:]
    assert run.returncode == 0, run.stdout[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("_")]
    # The budget: no half-precision config spills (fp32's exact-product tiles may, a little).
    half_spills = [line for line in rows if line.split()[2] in ("bf16", "fp16") and line.endswith("SPILLS")]
    assert half_spills == [], "\n".join(half_spills)
    kernels = {line.split()[0] for line in rows}
    # one kernel of each family at least
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_decode_split_kernel", "_bias_act_kernel",
                   "_sampler_step_kernel", "_filtered_lrelu_kernel", "_pixel_norm_kernel", "_normalize",
                   "_upfirdn2d_kernel", "_forward_kernel"):
        assert kernel in kernels, (kernel, sorted(kernels))
    assert configs >= 40


def test_kernels_that_spilled_on_sm80_fit():
    """filtered_lrelu's 32-wide input patches, group_norm's _grad_input and the exact-fp32 decode
    spilled 4-32 B on sm_80 (ptxas trimmed them to 56-128 registers): every fp16/fp32 config of
    these kernels compiles for sm_80 without a spill (about a minute on a free core)."""
    kernels = ("_filtered_lrelu_kernel", "_grad_input", "_decode_split_kernel")
    run = _python(["-m", "genfast", "compile-check", "--arch", "80", "--dtypes", "fp16,fp32", "--families",
                   "filtered_lrelu,group_norm,attention", "--kernels", ",".join(kernels), "--no-cuda"], timeout=900)
    summary = _SUMMARY.search(run.stdout)
    assert summary, run.stdout[-3000:] + run.stderr[-3000:]
    configs, failed, spilling, over = map(int, summary.groups())
    assert (failed, spilling, over) == (0, 0, 0), run.stdout[-6000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("_")]
    assert {row[0] for row in rows} == set(kernels)
    # the geometries whose 32-wide patches spilled are among them, with their register budget
    assert any(row[0] == "_filtered_lrelu_kernel" and "BXC=32" in row and "maxnreg=255" in row for row in rows)
    assert configs >= 20


def test_unknown_kernel_name_is_an_error():
    run = _python(["-m", "genfast", "compile-check", "--arch", "80", "--families", "vae",
                   "--kernels", "_no_such_kernel", "--no-cuda"], timeout=300)
    assert run.returncode != 0
    assert "_no_such_kernel" in run.stderr and "vae" in run.stderr


def test_cuda_kernels_do_not_spill():
    """Every CUDA kernel of the built extension, sm_80 and sm_90a, from its cubin: no stack
    frame (sampler_step spilled 16 B on sm_90a until its Box-Muller noise became a call; the
    float64 filtered_lrelu with run-time factors 16 B on sm_80 until its per-element upsampling
    phases became 32-bit: 64-bit divisions are subroutine calls)."""
    from genfast.compile_check import cuda_usage

    rows, note = cuda_usage([80, 90])
    if not rows:
        pytest.skip(note or "the extension has no CUDA kernels")
    spilling = {(r.kernel, r.arch, r.config): r.spill_bytes for r in rows if r.spill_bytes}
    assert spilling == {}, spilling
    assert {r.arch for r in rows} >= {"sm_80", "sm_90a"}


@pytest.mark.parametrize("match", ["WARP_SPECIALIZE=True", "PERSISTENT=True,USE_TMA=True",
                                   "PERSISTENT=True,USE_TMA=False"])
def test_hopper_forward_configs_compile(match):
    """The sm_90 forward's Hopper configs (warp-specialized, persistent over TMA or pointer
    tiles) compile without a spill, and a warp-specialized one really has its loop specialized
    (Triton leaves it as it is, silently, where it cannot: compile-check reports that as failed)."""
    run = _python(["-m", "genfast", "compile-check", "--arch", "90", "--dtypes", "fp16", "--families", "attention",
                   "--kernels", "_fwd_kernel", "--match", match, "--limit", "2", "--no-cuda"], timeout=900)
    summary = _SUMMARY.search(run.stdout)
    assert summary, run.stdout[-3000:] + run.stderr[-3000:]
    configs, failed, spilling, over = map(int, summary.groups())
    assert (failed, spilling, over) == (0, 0, 0), run.stdout[-6000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("_fwd_kernel")]
    assert configs == len(rows) == 2 and all(set(match.split(",")) <= set(row) for row in rows)
