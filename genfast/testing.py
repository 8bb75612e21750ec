"""Helpers for testing fast paths against their references (used by genfast's own tests).

The criterion is flash-attn's: the error of the fast path against a float64 reference must
be at most twice the error of the same PyTorch ops run in the low precision, plus a rounding
floor. NaN never passes.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch


def fresh_seed() -> int:
    """A new random seed per call (tests use fresh inputs); printed in failure messages."""
    return int.from_bytes(os.urandom(4), "little")


def rounding_floor(dtype: torch.dtype, scale: float) -> float:
    """A few units in the last place of ``dtype`` at magnitude ``scale``. In float64 the
    "same ops in the same precision" error is often exactly 0, while two correct libms
    (glibc vs. Sleef) differ by a few ulp per call, so float64 gets a wider (still tiny) floor."""
    ulps = 1024 if dtype == torch.float64 else 4
    return ulps * torch.finfo(dtype).eps * max(1.0, scale)


def error_vs_reference(
    fast: torch.Tensor,
    ref64: torch.Tensor,
    lowp: Union[torch.Tensor, Sequence[torch.Tensor]],
    name: str = "output",
    mask: Optional[torch.Tensor] = None,
    floor: Optional[float] = None,
) -> tuple:
    """Assert ``|fast - ref64| <= 2 * |lowp - ref64| + floor`` (max norms); returns both errors.

    ``ref64`` is the reference in float64, ``lowp`` the same reference run in ``fast``'s dtype,
    or a sequence of such runs (other memory layouts or batch orders: one run's rounding error
    is a noisy estimate, and a reduction over many elements can be 2-3x luckier in one order than
    in another); the run that errs most is the baseline.
    ``mask`` (bool, broadcastable) excludes elements where the spec is discontinuous.
    """
    lowps = list(lowp) if isinstance(lowp, (list, tuple)) else [lowp]
    for p in lowps:
        assert fast.shape == ref64.shape == p.shape, f"{name}: shapes differ {fast.shape} {ref64.shape} {p.shape}"
    assert not torch.isnan(fast).any(), f"{name}: NaN in the fast result"
    f, r = fast.double(), ref64.double()
    ps = [p.double() for p in lowps]
    if mask is not None:
        f, r, ps = f[mask], r[mask], [p[mask] for p in ps]
    if f.numel() == 0:
        return 0.0, 0.0
    err_fast = (f - r).abs().max().item()
    err_lowp = max((p - r).abs().max().item() for p in ps)
    if floor is None:
        floor = rounding_floor(fast.dtype, r.abs().max().item())
    assert err_fast <= 2 * err_lowp + floor, (
        f"{name}: max error {err_fast:.3e} > 2 x PyTorch low-precision error {err_lowp:.3e} + floor {floor:.3e}"
    )
    return err_fast, err_lowp


def count_table_runs(table, on_run, patch=setattr) -> None:
    """Calls ``on_run()`` each time a backend of the dispatch table ``table`` (an
    ``OpDispatcher``) runs, whether the call goes through the table (``run``) or through a
    prepared eager call (``call_prepared``); tests use it to check that genfast really ran.
    ``patch(obj, name, value)`` installs the wrappers (``monkeypatch.setattr`` to undo them)."""
    run, call_prepared = table.run, table.call_prepared

    def counted_run(*args, **kwargs):
        on_run()
        return run(*args, **kwargs)

    def counted_call_prepared(*args, **kwargs):
        result = call_prepared(*args, **kwargs)
        if result is not None:  # None: no prepared call ran, the call goes on through ``run``
            on_run()
        return result

    patch(table, "run", counted_run)
    patch(table, "call_prepared", counted_call_prepared)
