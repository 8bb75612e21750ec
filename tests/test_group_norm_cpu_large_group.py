"""The CPU group_norm backward with the SiLU fused keeps each group's dz between its two passes
when the group is small (at most 2^18 elements, csrc/group_norm_cpu.cpp kKeepDzElements) and
recomputes it for larger groups: both paths against the float64 reference (the small one is
also covered by every shape of tests/test_group_norm.py)."""
import pytest
import torch

from genfast.ops.group_norm import DISPATCH

import helpers
from op_checks.group_norm import CPU, check

KEEP_DZ_LIMIT = 1 << 18


@pytest.mark.parametrize("shape,num_groups,kept", [
    ((2, 6, 37, 41), 3, True),       # groups of 2 * 1517 elements
    ((1, 2, 601, 443), 1, False),    # one group of 532486 elements
    ((1, 3, 263, 997), 3, False),    # 262211 elements per group, just above the limit
], ids=["kept", "recomputed", "just-above"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_cpu_silu_backward_both_paths(seed, shape, num_groups, kept, layout):
    helpers.require(DISPATCH, "cpu", CPU, torch.float32)
    assert (shape[1] // num_groups * shape[2] * shape[3] <= KEEP_DZ_LIMIT) == kept
    calls = []
    real = DISPATCH.backends["cpu"].fn
    DISPATCH.backends["cpu"].fn = lambda *a: calls.append(1) or real(*a)
    try:
        check("cpu", torch.float32, shape, num_groups, layout, silu=True)
    finally:
        DISPATCH.backends["cpu"].fn = real
    assert len(calls) >= 2  # genfast's CPU kernels ran the forward and the backward
