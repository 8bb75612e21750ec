"""The end-to-end model suite (``python -m genfast bench models``) runs every case in its tiny
preset on the CPU: rows come back timed, with throughput, and the genfast paths agree with the
reference; a wrong fast path is reported as FAIL, not timed."""
import contextlib
import math

import pytest
import torch

from genfast.bench import cli
from genfast.bench import models as suite
from genfast.bench.timing import CHECK_TOLERANCE, run_case, strict_dispatch

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@contextlib.contextmanager
def one_thread():
    """Tiny models on a shared CPU: one thread avoids OpenMP threads waiting on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_tiny(cases=suite.CASES, use_compile=False, patch=None):
    rows = []
    with one_thread(), strict_dispatch():
        for case in suite.build_cases("cpu", quick=not use_compile, use_compile=use_compile, preset="tiny",
                                      cases=cases):
            if patch is not None:
                patch(case)
            rows += run_case(case, None, quick=True)
    return rows


def test_models_suite_runs_every_case_and_the_fast_paths_agree():
    rows = run_tiny()
    cases = {(r["mode"], r["act"]) for r in rows}
    assert cases == {("train", "gpt"), ("generate", "gpt"), ("sample", "unet-ddpm"), ("train", "stylegan2"),
                     ("train", "dcgan"), ("train", "mlpgan"), ("train", "vae")}
    assert len(rows) == len(suite.CASES) * len(suite.PROVIDERS)
    for row in rows:
        name = f"{row['act']} {row['mode']} {row['provider']}"
        if row["provider"] in ("genfast", "reference") or (row["provider"] == "sdpa" and row["act"] == "gpt"):
            assert row["status"] == "ok", f"{name}: {row['status']} {row['detail']}"
            assert row["median_ms"] > 0 and row["reps"] >= 5, name
            assert row["throughput"] > 0 and row["unit"] in ("tok/s", "img/s"), name
            assert row["gbps"] is None, name  # no byte count for a whole model
        else:
            assert row["status"] == "n/a" and row["detail"], name  # compile disabled; sdpa is GPT only
        if row["provider"] == "genfast":
            assert row["max_rel_err"] is not None and row["max_rel_err"] <= CHECK_TOLERANCE[torch.float32], name
            assert row["vs_reference"] is not None and row["vs_reference"] > 0, name
    gpt_train = next(r for r in rows if r["act"] == "gpt" and r["mode"] == "train" and r["provider"] == "genfast")
    assert gpt_train["tflops"] > 0


def test_models_suite_reports_a_wrong_fast_path_as_fail():
    def sabotage(case):  # the genfast VAE step's loss off by 1%: the check must catch it
        factory = case.providers["genfast"].factory

        def wrong(inputs):
            thunk = factory(inputs)
            return lambda: tuple(t * 1.01 for t in thunk())
        case.providers["genfast"].factory = wrong

    rows = run_tiny(cases=("vae",), patch=sabotage)
    genfast = next(r for r in rows if r["provider"] == "genfast")
    assert genfast["status"] == "FAIL" and genfast["median_ms"] is None and "differs" in genfast["detail"]


def test_generation_check_accepts_greedy_tokens_and_rejects_others(seed):
    (case,) = suite.build_cases("cpu", preset="tiny", cases=("gpt-generate",), use_compile=False)
    inputs = case.make_inputs(0)
    with one_thread(), strict_dispatch():
        tokens = case.providers["reference"].factory(inputs)()
        fast = case.providers["genfast"].factory(inputs)()
    ok, err = case.check(fast, tokens, torch.float32)
    assert ok and err <= CHECK_TOLERANCE[torch.float32]
    prompt_len = inputs["prompt"].shape[1]
    wrong = tokens.clone()
    wrong[0, prompt_len] = (wrong[0, prompt_len] + 1) % 64  # not the greedy choice
    ok, err = case.check(wrong, tokens, torch.float32)
    assert not ok and err > CHECK_TOLERANCE[torch.float32]
    ok, err = case.check(tokens[:, :-1], tokens, torch.float32)
    assert not ok and math.isinf(err)


def test_models_suite_compile_baseline_runs():
    rows = run_tiny(cases=("vae",), use_compile=True)
    compiled = next(r for r in rows if r["provider"] == "compile")
    assert compiled["status"] == "ok", compiled["detail"]
    assert compiled["median_ms"] > 0 and compiled["throughput"] > 0


def test_models_suite_is_registered_and_sized_as_the_issue_asks():
    assert cli.OPS["models"] is suite
    assert suite.count_cases("cpu", quick=True) == len(list(suite.CASES))
    from genfast.models import GPT, GPTConfig

    spec = suite.PRESETS["gpu"]["gpt-train"]
    with torch.device("meta"):
        model = GPT(GPTConfig(**spec["config"]))
    assert 123e6 < sum(p.numel() for p in model.parameters()) < 125e6 and spec["seq"] == 1024
    assert suite.PRESETS["gpu"]["stylegan2"]["g"]["img_resolution"] == 256
    assert suite.preset_for("cpu", quick=True) == "cpu-quick"
    assert suite.compile_unavailable("cpu", quick=True, use_compile=True)
    assert suite.compile_unavailable("cpu", quick=False, use_compile=True) is None
    with pytest.raises(KeyError):
        list(suite.build_cases("cpu", preset="no-such-preset"))
