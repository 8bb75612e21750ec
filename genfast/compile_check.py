"""``python -m genfast compile-check``: compile every Triton launch genfast makes for real GPU
targets, without a GPU, and report each kernel's resource use; read the CUDA kernels' resource
use from the built extension.

How the launches are found: each family below lists representative problems (dtypes, shapes,
flags). The checker calls genfast's own launchers (``genfast.triton_kernels.*``) on ``meta``
tensors while ``JITFunction.run`` and ``Autotuner.run`` are replaced by a recorder, so the
constexprs, num_warps/num_stages and autotune configs (after the launcher's own pruning) are
exactly the ones the launcher passes: nothing is duplicated here. Each recorded launch is then
compiled with Triton's compiler for ``GPUTarget("cuda", arch, 32)`` through ``warmup`` under a
stand-in driver that only names the target (nothing runs). Registers and spills come from
ptxas's ``-v`` log (cuobjdump on the cubin when Triton's cache answered), shared memory from
the kernel's metadata. The grid each launcher computes is checked against CUDA's axis limits.

Exit status 1 when a config fails to compile, needs more shared memory than the target has, or
a grid is over CUDA's limits.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable

# Shared memory a block may opt into (bytes): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
GRID_LIMITS = (2**31 - 1, 65535, 65535)
FAMILIES = ("attention", "bias_act", "diffusion", "filtered_lrelu", "gan", "group_norm", "upfirdn2d", "vae")
DTYPES = ("bf16", "fp16", "fp32")


@dataclasses.dataclass
class Launch:
    family: str
    problem: str
    dtype: str
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict  # constexprs and launch options (num_warps, num_stages, ...)
    grid: tuple

    def config(self) -> str:
        """The launch's constexprs and options as ``K=V`` pairs (tensors' dtypes are in the key)."""
        return " ".join(f"{k}={_short(v)}" for k, v in sorted(self.kwargs.items()) if v is not None)

    def key(self) -> tuple:
        """What Triton specialises on: argument types, ints equal to 1 or divisible by 16, constexprs."""
        sig = []
        for a in self.args:
            if hasattr(a, "dtype") and hasattr(a, "data_ptr"):
                sig.append(str(a.dtype))
            elif isinstance(a, bool):
                sig.append(("b", a))
            elif isinstance(a, int):
                sig.append("1" if a == 1 else ("D" if a % 16 == 0 else ("i64" if abs(a) >= 2**31 else "i")))
            else:
                sig.append(type(a).__name__)
        return (self.fn.__name__, tuple(sig), tuple(sorted((k, str(v)) for k, v in self.kwargs.items())))


@dataclasses.dataclass
class Result:
    kernel: str
    arch: str
    dtype: str
    config: str
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None
    over_shared: bool = False
    problem: str = ""


def _short(v) -> str:
    s = str(v)
    return s.replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------------------------
class _Recorder:
    """Replaces JITFunction.run / Autotuner.run: launches are recorded, not run."""

    def __init__(self, max_autotune_configs: int | None):
        self.launches: list[tuple] = []  # (fn, args, kwargs, grid)
        self.max_autotune_configs = max_autotune_configs

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        jit_run, tune_run = JITFunction.run, Autotuner.run
        recorder = self

        def record_jit(fn, *args, grid, warmup, **kwargs):
            if warmup:
                return jit_run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            recorder.launches.append((fn, args, kwargs, _resolve_grid(fn, grid, args, kwargs)))
            return None

        def record_autotuned(tuner, *args, **kwargs):
            kwargs.pop("warmup", None)
            grid = kwargs.pop("grid")
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            tuner.nargs = None
            if recorder.max_autotune_configs is not None and len(configs) > recorder.max_autotune_configs:
                # Quick mode: the first and the last of the pruned list (smallest and largest tiles).
                n = recorder.max_autotune_configs
                configs = configs[: n - 1] + configs[-1:] if n > 1 else configs[:1]
            for config in configs:
                merged = dict(kwargs, **{k: v for k, v in config.all_kwargs().items() if v is not None})
                recorder.launches.append((tuner.fn, args, merged, _resolve_grid(tuner.fn, grid, args, merged)))
            return None

        JITFunction.run, Autotuner.run = record_jit, record_autotuned
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = jit_run, tune_run


def _resolve_grid(fn, grid, args, kwargs) -> tuple:
    if callable(grid):
        named = dict(zip(fn.arg_names, args))
        named.update(kwargs)
        grid = grid(named)
    return tuple(int(g) for g in grid)


def grid_problems(grid: tuple) -> list[str]:
    """CUDA's launch limits on each grid axis: x < 2^31, y and z <= 65535."""
    return [f"grid axis {'xyz'[i]} = {g} exceeds {GRID_LIMITS[i]}" for i, g in enumerate(grid) if g > GRID_LIMITS[i]]


# ---------------------------------------------------------------------------------------------
# Representative problems of every family (meta tensors: nothing is allocated)
# ---------------------------------------------------------------------------------------------
def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]


def _meta(*shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _attention_problems(dt, quick):
    import torch

    from .triton_kernels import attention as A

    problems = []
    head_dims = (64, 128) if quick else (64, 128, 256, 80)
    variants = [dict(name="causal", window_left=-1, window_right=0)]
    if not quick:
        variants += [
            dict(name="plain"),
            dict(name="bias", bias=True),
            dict(name="alibi+softcap+window", alibi=True, softcap=30.0, window_left=128, window_right=0),
            dict(name="dropout", dropout_p=0.1),
            dict(name="varlen", varlen=True, window_left=-1, window_right=0),
            # a (1, 1, S, S) mask with S >= 46,341: offsets past 2^31, the BIAS_I64 path (D128 only)
            dict(name="bias i64", bias=True, big=True),
        ]
    elif dt == "bf16":
        variants.append(dict(name="bias", bias=True))
    for D in head_dims:
        for v in variants:
            if quick and D == 64 and v["name"] != "causal":
                continue
            if v.get("big") and D != 128:
                continue
            name = v["name"]
            B, H, Hk, S = (1, 8, 2, 4096) if v.get("varlen") else (2, 8, 2, 1000)
            if v.get("big"):
                B, S = 1, 46400
            q = _meta(B, H, S, D, dtype=dt)
            k = _meta(B, Hk, S, D, dtype=dt)
            vv = _meta(B, Hk, S, D, dtype=dt)
            kw = dict(scale=D ** -0.5, window_left=v.get("window_left", -1), window_right=v.get("window_right", -1),
                      softcap=v.get("softcap", 0.0), dropout_p=v.get("dropout_p", 0.0))
            if v.get("alibi"):
                kw["alibi_slopes"] = _meta(H, dtype=torch.float32)
            if v.get("bias"):
                kw["bias"] = _meta(1, 1, S, S, dtype=dt)
            if v.get("varlen"):
                kw.update(cu_seqlens_q=_meta(5, dtype=torch.int32), cu_seqlens_k=_meta(5, dtype=torch.int32),
                          max_seqlen_q=1500, max_seqlen_k=1500)
            problems.append((f"forward D{D} {name}", lambda q=q, k=k, v=vv, kw=kw: A.forward(q, k, v, **kw)))
            out, lse = _meta(B, H, S, D, dtype=dt), _meta(B, H, S, dtype=torch.float32)
            dets = (False, True) if not quick else (False,)
            for det in dets:
                problems.append((f"backward D{D} {name}{' deterministic' if det else ''}",
                                 lambda q=q, k=k, v=vv, kw=kw, out=out, lse=lse, det=det:
                                 A.backward(out, q, k, v, out, lse, deterministic=det, **kw)))
        if not quick or D == 128:
            B, H, Hk, S = 4, 32, 8, 8192
            qd = _meta(B, H, 1, D, dtype=dt)
            kc = _meta(B, Hk, S, D, dtype=dt)
            lens = _meta(B, dtype=torch.int32)
            problems.append((f"decode D{D}", lambda qd=qd, kc=kc, lens=lens, D=D:
                             A.decode(qd, kc, kc, lens, scale=D ** -0.5)))
            # a paged cache (block table looked up per key column) with left pads; cache rows by index
            pages = _meta(B * S // 256 + 1, Hk, 256, D, dtype=dt)
            table = _meta(B, S // 256, dtype=torch.int32)
            problems.append((f"decode D{D} paged+leftpad", lambda qd=qd, kc=pages, lens=lens, D=D, t=table:
                             A.decode(qd, kc, kc, lens, scale=D ** -0.5, block_table=t, cache_leftpad=lens)))
            if not quick:
                problems.append((f"decode D{D} cache_batch_idx", lambda qd=qd, kc=kc, lens=lens, D=D:
                                 A.decode(qd, kc, kc, lens, scale=D ** -0.5, cache_batch_idx=lens)))
            # rotary of q / the new k fused with the cache append (flash-attn layout (B, S, H, D)):
            # full-width GPT-NeoX rotary into a plain cache; half-width GPT-J rotary into pages
            qr, kn = _meta(B, 1, H, D, dtype=dt), _meta(B, 1, Hk, D, dtype=dt)
            kcr, pgr = _meta(B, S, Hk, D, dtype=dt), _meta(B * S // 256 + 1, 256, Hk, D, dtype=dt)
            rot, rot_half = _meta(S, D // 2, dtype=torch.float32), _meta(S, D // 4, dtype=torch.float32)
            problems.append((f"rotary_append D{D}", lambda qr=qr, kc=kcr, kn=kn, lens=lens, rot=rot:
                             A.rotary_append(qr, kc, kc, kn, kn, lens, rot, rot, interleaved=False,
                                             q_same_position=False)))
            problems.append((f"rotary_append D{D} paged interleaved", lambda qr=qr, kc=pgr, kn=kn, lens=lens,
                             rot=rot_half, t=table: A.rotary_append(qr, kc, kc, kn, kn, lens, rot, rot,
                                                                    interleaved=True, q_same_position=True,
                                                                    block_table=t)))
    return problems


def _bias_act_problems(dt, quick):
    from .triton_kernels import bias_act as K

    x = _meta(4, 64, 33, 33, dtype=dt)
    xl = _meta(4 * 33 * 33, 512, dtype=dt)  # channels_last rows
    b = _meta(64, dtype=dt)
    bl = _meta(512, dtype=dt)
    acts = (K.LRELU, K.SELU, K.SWISH) if quick else range(9)
    problems = []
    for act in acts:
        for mode in (K.FORWARD, K.GRAD, K.GRAD2):
            for layout, xx, bb, C, S in (("nchw", x, b, 64, 33 * 33), ("nhwc", xl, bl, 512, 1)):
                if quick and layout == "nhwc" and mode != K.GRAD:
                    continue
                db = _meta(C, dtype=dt) if mode == K.GRAD else None
                problems.append((f"act {act} mode {mode} {layout}",
                                 lambda act=act, mode=mode, xx=xx, bb=bb, C=C, S=S, db=db:
                                 K.bias_act(mode, act, _meta(*xx.shape, dtype=xx.dtype), xx, bb,
                                            xx if mode else None, xx if mode == K.GRAD2 else None,
                                            C, S, 0.2, 1.4, 256.0 if act == K.LRELU else -1.0, db=db)))
    return problems


def _diffusion_problems(dt, quick):
    import torch

    from .triton_kernels import diffusion as K

    B, per = 8, 4 * 64 * 64
    x = _meta(B, per, dtype=dt)
    coefs = _meta(B, 13, dtype=torch.float32)
    problems = [
        ("sampler_step plain", lambda: K.sampler_step(x, None, x, x, None, None, None, None, coefs, 13, None, -1.0,
                                                      False, 1.0, None, per)),
        ("sampler_step full", lambda: K.sampler_step(x, x, x, x, x, x, x, None, coefs, 13,
                                                     _meta(B, dtype=torch.float32), 1.0, True, 7.5, 1234, per)),
        ("add_noise seeded", lambda: K.add_noise(x, x, x, None, _meta(B, dtype=torch.int64),
                                                 _meta(1000, dtype=torch.float32), _meta(1000, dtype=torch.float32),
                                                 2, 99, per)),
        ("per_sample_sums", lambda: K.per_sample_sums(x, x, 1, 7.5, per, 4)),
        ("combine", lambda: K.combine(x, x, x, x, _meta(B, dtype=torch.float32), 1.0, 0.5, per, False)),
        ("timestep_embedding", lambda: K.timestep_embedding(_meta(B, 320, dtype=dt), _meta(B, dtype=torch.int64),
                                                            320, True, -9.21, 160.0, 1.0)),
    ]
    if not quick:
        problems += [
            ("sampler_step noise tensor", lambda: K.sampler_step(x, None, x, x, None, x, None, x, coefs, 13, None,
                                                                 1.0, False, 1.0, None, per)),
            ("add_noise tensor", lambda: K.add_noise(x, x, x, x, _meta(B, dtype=torch.int64),
                                                     _meta(1000, dtype=torch.float32),
                                                     _meta(1000, dtype=torch.float32), 4, None, per)),
            ("per_sample_sums mse", lambda: K.per_sample_sums(x, x, 0, 1.0, per, 1)),
        ]
    return problems


def _filtered_lrelu_problems(dt, quick):
    import torch

    from .ops.filtered_lrelu import adjoint_plan, forward_plan
    from .triton_kernels import filtered_lrelu as K

    # (name, input size, up, down, taps, separable, padding): StyleGAN3's layers and a 2-D filter.
    geometries = [("up2 down2 12 taps", 36, 2, 2, 12, True, (11, 10, 11, 10)),
                  ("up4 down2 24 taps", 20, 4, 2, 24, True, (23, 20, 23, 20)),
                  ("up1 down1 6 taps 2-D", 32, 1, 1, 6, False, (5, 5, 5, 5))]
    if not quick:
        geometries += [("up2 down1 12 taps", 64, 2, 1, 12, True, (11, 10, 11, 10)),
                       ("up1 down2 12 taps", 64, 1, 2, 12, True, (5, 5, 5, 5))]
    else:
        geometries = geometries[:1] if dt != "bf16" else geometries
    problems = []
    for name, size, up, down, taps, sep, pad in geometries:
        fu = _meta(*((taps,) if sep else (taps, taps)), dtype=torch.float32)
        fd = _meta(*((taps,) if sep else (taps, taps)), dtype=torch.float32)
        for adjoint, mode in ((False, K.ACT), (True, K.MASK)):
            plan_fn = adjoint_plan if adjoint else forward_plan
            plan = plan_fn(size, size, fu, fd, up, down, pad)
            # the adjoint chain reads dy, the forward chain's output
            in_size = _out(size, up, down, taps, pad) if adjoint else size
            x = _meta(4, 32, in_size, in_size, dtype=dt)
            out = _meta(4, 32, plan.oh, plan.ow, dtype=dt)
            signs = _meta(4, 32, plan.th, plan.tw, dtype=torch.uint8)
            problems.append((f"{name} {'backward' if adjoint else 'forward'}",
                             lambda mode=mode, out=out, signs=signs, x=x, fu=fu, fd=fd, plan=plan, adjoint=adjoint:
                             K.filtered_lrelu(mode, out, signs, x, None if adjoint else _meta(32, dtype=x.dtype),
                                              fu, fd, plan, 1.41, 0.2, -1.0 if adjoint else 256.0)))
    return problems


def _out(size, up, down, taps, pad):
    """The forward chain's output size (what the adjoint chain reads)."""
    return (size * up + pad[2] + pad[3] - taps + 1 - taps) // down + 1


def _gan_problems(dt, quick):
    from .triton_kernels import gan as K

    problems = []
    for name, outer, C, S in (("nchw", 8, 512, 16 * 16), ("rows", 4096, 512, 1), ("wide", 8, 8192, 4)):
        if quick and name == "wide":
            continue
        x = _meta(outer, C, S, dtype=dt)
        for mode in (K.FORWARD, K.GRAD):
            problems.append((f"pixel_norm {name} mode {mode}", lambda x=x, mode=mode, outer=outer, C=C, S=S:
                             K.pixel_norm(mode, x, x, x if mode else None, outer, C, S, 1e-8)))
    return problems


def _group_norm_problems(dt, quick):
    import torch

    from .ops.group_norm import Geometry
    from .triton_kernels import group_norm as K

    problems = []
    for cl in (False, True):
        for N, C, S, G in ((2, 320, 64 * 64, 32), (1, 128, 512 * 512, 32)):
            if quick and S > 4096:
                continue
            geo = Geometry(N, C, S, G, cl)
            x = _meta(N, C, S, dtype=dt)
            w = _meta(C, dtype=dt)
            stats = _meta(N, G, dtype=torch.float32)
            for silu in ((True,) if quick else (False, True)):
                problems.append((f"forward {'nhwc' if cl else 'nchw'} C{C} S{S} silu={silu}",
                                 lambda geo=geo, x=x, w=w, stats=stats, silu=silu:
                                 K.forward(x, w, w, x, stats, stats, geo, 1e-5, silu)))
                problems.append((f"backward {'nhwc' if cl else 'nchw'} C{C} S{S} silu={silu}",
                                 lambda geo=geo, x=x, w=w, stats=stats, silu=silu:
                                 K.backward(x, x, stats, stats, w, w, x, w, w, geo, silu)))
    return problems


def _upfirdn2d_problems(dt, quick):
    import torch

    from .triton_kernels import upfirdn2d as K

    problems = []
    for name, up, down, taps, sep in (("up2 4 taps separable", 2, 1, 4, True), ("down2 4 taps 2-D", 1, 2, 4, False),
                                      ("up2 down2 12 taps separable", 2, 2, 12, True)):
        if quick and "12" in name:
            continue
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = torch.empty((2, 64, 32, 32), dtype=_torch_dtype(dt) if isinstance(dt, str) else dt, device="meta",
                            memory_format=fmt)
            p0, p1 = (taps - 1) // 2 + (up - 1), taps // 2
            oh = (32 * up + p0 + p1 - taps) // down + 1
            out = torch.empty((2, 64, oh, oh), dtype=x.dtype, device="meta", memory_format=fmt)
            g = _meta(*((taps,) if sep else (taps, taps)), dtype=torch.float32)
            problems.append((f"{name} {'nhwc' if cl else 'nchw'}",
                             lambda out=out, x=x, g=g, up=up, down=down, p0=p0, p1=p1:
                             K.upfirdn2d(out, x, g, up, up, down, down, p0, p1, p0, p1)))
    return problems


def _vae_problems(dt, quick):
    from .ops.vae import CHUNK_COLS
    from .triton_kernels import vae as K

    rows, cols = 8, 4 * 64 * 64
    mu = _meta(rows, cols, dtype=dt)
    kl = _meta(rows, cols // CHUNK_COLS, dtype=_torch_dtype("fp32"))
    d = _meta(rows, dtype=dt)
    return [("forward", lambda: K.forward(mu, mu, mu, mu, kl, rows, cols, CHUNK_COLS)),
            ("forward kl only", lambda: K.forward(mu, mu, None, None, kl, rows, cols, CHUNK_COLS)),
            ("backward", lambda: K.backward(mu, mu, mu, mu, d, mu, mu, rows, cols, CHUNK_COLS))]


PROBLEMS: dict[str, Callable] = {
    "attention": _attention_problems, "bias_act": _bias_act_problems, "diffusion": _diffusion_problems,
    "filtered_lrelu": _filtered_lrelu_problems, "gan": _gan_problems, "group_norm": _group_norm_problems,
    "upfirdn2d": _upfirdn2d_problems, "vae": _vae_problems,
}


def collect_launches(families: Iterable[str], dtypes: Iterable[str], quick: bool,
                     arch: int | None = None) -> tuple[list[Launch], list[str]]:
    """Every distinct launch the launchers make for the problems of ``families`` x ``dtypes``,
    and the grid-limit problems found on the way. With ``arch`` the launchers run under that
    target, so their pruners see its shared memory (without a driver they assume 99 KB and
    drop the large tiles an A100/H100 would launch)."""
    recorder = _Recorder(max_autotune_configs=2 if quick else None)
    launches, seen, grid_errors = [], set(), []
    for family in families:
        for dt in dtypes:
            for problem, call in PROBLEMS[family](_torch_dtype(dt), quick):
                start = len(recorder.launches)
                with recorder.active(), (_target(arch) if arch is not None else contextlib.nullcontext()):
                    call()
                for fn, args, kwargs, grid in recorder.launches[start:]:
                    for issue in grid_problems(grid):
                        grid_errors.append(f"{family} {dt} {problem}: {fn.__name__} {issue}")
                    launch = Launch(family, problem, dt, fn, args, kwargs, grid)
                    if launch.key() not in seen:
                        seen.add(launch.key())
                        launches.append(launch)
    return launches, grid_errors


def limit_launches(launches: list[Launch], per_kernel: int) -> list[Launch]:
    """The first ``per_kernel`` launches of each (family, kernel, dtype)."""
    counts: dict[tuple, int] = {}
    kept = []
    for launch in launches:
        key = (launch.family, launch.fn.__name__, launch.dtype)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= per_kernel:
            kept.append(launch)
    return kept


# ---------------------------------------------------------------------------------------------
# Compiling for a target without a GPU
# ---------------------------------------------------------------------------------------------
class _TargetDriver:
    """Stands in for Triton's GPU driver: it only names the compile target (warmup never launches)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"compile-check-{self.target.backend}-{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")


@contextlib.contextmanager
def _target(arch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    driver = triton.runtime.driver
    previous = driver._active
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    try:
        yield
    finally:
        driver._active = previous


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _cubin_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) from cuobjdump when ptxas's log is not available (cache hit)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    reg = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return (int(reg.group(1)) if reg else None, int(stack.group(1)) if stack else None)


def compile_launch(launch: Launch, arch: int) -> Result:
    from triton import knobs

    result = Result(launch.fn.__name__, f"sm_{arch}", launch.dtype, launch.config(), problem=launch.problem)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with _target(arch), contextlib.redirect_stdout(log):
            kernel = launch.fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    except Exception as exc:  # a compile error of this config: reported, the run goes on
        result.seconds = time.perf_counter() - start
        cause = exc.__cause__ or exc  # Triton's CompilationError wraps the real error
        message = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        location = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("at ")][:1]
        result.error = f"{type(cause).__name__}: " + " | ".join(location + message[-3:])
        return result
    result.seconds = time.perf_counter() - start
    text = log.getvalue()
    regs, spills = _PTXAS_REGS.findall(text), _PTXAS_SPILL.findall(text)
    if regs:
        result.registers, result.spill_bytes = int(regs[-1]), int(spills[-1]) if spills else 0
    else:
        result.registers, result.spill_bytes = _cubin_usage(kernel.asm["cubin"])
    result.shared_bytes = int(kernel.metadata.shared)
    result.over_shared = result.shared_bytes > SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
    if launch.kwargs.get("WARP_SPECIALIZE") and "ttg.warp_specialize" not in kernel.asm.get("ttgir", ""):
        # Triton leaves a loop it cannot specialize as it is, silently (e.g. on 8 warps).
        result.error = "WARP_SPECIALIZE config compiled without a warp-specialized loop"
    return result


# ---------------------------------------------------------------------------------------------
# CUDA kernels of the built extension
# ---------------------------------------------------------------------------------------------
def cuda_usage(archs: Iterable[int]) -> tuple[list[Result], str | None]:
    """Per-kernel registers / stack / static shared memory of the extension's cubins."""
    try:
        from . import _ext

        path = _ext._C.__file__
    except Exception as exc:  # no extension built: nothing to read
        return [], f"no CUDA extension to read ({type(exc).__name__}: {exc})"
    run = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True)
    if run.returncode != 0:
        return [], f"cuobjdump failed on {path}: {run.stderr.strip()[:300]}"
    wanted = {f"sm_{a}" for a in archs} | {f"sm_{a}a" for a in archs}
    results, arch, names = [], None, []
    entries = []
    for line in run.stdout.splitlines():
        m = re.match(r"arch = (sm_\w+)", line.strip())
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and arch in wanted:
            entries.append((arch, pending, *map(int, m.groups())))
            names.append(pending)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(demangled) != len(names):
        demangled = names
    for (arch, _, reg, stack, shared, local), name in zip(entries, demangled):
        if name.endswith(")") and "(" in name:  # drop the parameter list
            depth, cut = 0, len(name)
            for i in range(len(name) - 1, -1, -1):
                depth += {")": 1, "(": -1}.get(name[i], 0)
                if depth == 0:
                    cut = i
                    break
            name = name[:cut]
        name = re.sub(r"^void |genfast::|\(anonymous namespace\)::", "", name)
        kernel, _, targs = name.partition("<")
        results.append(Result(kernel.split("::")[-1], arch, "cuda", ("<" + targs) if targs else "", reg,
                              stack + local, shared))
    return results, None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="kernel families, comma separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="dtypes, comma separated (bf16, fp16, fp32)")
    parser.add_argument("--quick", action="store_true",
                        help="a handful of problems per family and at most 2 configs per autotuned launch")
    parser.add_argument("--kernels", default="",
                        help="only these Triton kernels (function names, comma separated; default: all)")
    parser.add_argument("--limit", type=int, default=0,
                        help="at most this many configs per kernel and dtype (the first ones found; 0: all)")
    parser.add_argument("--match", default="",
                        help="only configs whose K=V list holds every one of these (comma separated, e.g. "
                             "PERSISTENT=True,HEAD_DIM=128)")
    parser.add_argument("--no-cuda", action="store_true", help="skip reading the CUDA extension's resource usage")
    parser.add_argument("--cache", action="store_true",
                        help="use Triton's cache (default: a fresh one, so every config is compiled and timed)")


def _table(rows: list[Result], out, header_line: bool = True) -> None:
    header = ("kernel", "arch", "dtype", "regs", "spill", "smem KB", "sec", "config")
    if header_line:
        print(f"{header[0]:<28} {header[1]:<6} {header[2]:<5} {header[3]:>4} {header[4]:>6} {header[5]:>8} "
              f"{header[6]:>6}  {header[7]}", file=out)
    for r in rows:
        flag = " FAILED" if r.error else (" OVER-SMEM" if r.over_shared else (" SPILLS" if r.spill_bytes else ""))
        regs = "-" if r.registers is None else r.registers
        spill = "-" if r.spill_bytes is None else r.spill_bytes
        smem = "-" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.1f}"
        print(f"{r.kernel[:28]:<28} {r.arch:<6} {r.dtype:<5} {regs:>4} {spill:>6} {smem:>8} {r.seconds:>6.1f}  "
              f"{r.config}{flag}", file=out)
        if r.error:
            print(f"    error: {r.error[:600]}", file=out)


def run(args) -> int:
    archs = [int(a) for a in str(args.arch).split(",") if a.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    kernels = {k.strip() for k in getattr(args, "kernels", "").split(",") if k.strip()}
    for f in families:
        if f not in PROBLEMS:
            raise SystemExit(f"compile-check: unknown family {f!r}; known: {', '.join(FAMILIES)}")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"compile-check: unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile-check: unset TRITON_INTERPRET (the launchers pick interpreter tiles under it)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if not args.cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="genfast-compile-check-")
    started = time.perf_counter()
    results, grid_errors = [], []
    _table([], sys.stdout)
    for arch in archs:
        launches, arch_grid_errors = collect_launches(families, dtypes, args.quick, arch)
        grid_errors += [f"sm_{arch} {e}" for e in arch_grid_errors]
        if kernels:
            unknown = kernels - {launch.fn.__name__ for launch in launches}
            if unknown:
                raise SystemExit(f"compile-check: --kernels {', '.join(sorted(unknown))}: no such kernel launched by "
                                 f"the families {', '.join(families)}")
            launches = [launch for launch in launches if launch.fn.__name__ in kernels]
        wanted = [m.strip() for m in getattr(args, "match", "").split(",") if m.strip()]
        if wanted:
            launches = [launch for launch in launches if set(wanted) <= set(launch.config().split())]
        if args.limit > 0:
            launches = limit_launches(launches, args.limit)
        for launch in launches:
            r = compile_launch(launch, arch)
            results.append(r)
            _table([r], sys.stdout, header_line=False)
            sys.stdout.flush()
    cuda_rows, cuda_note = ([], None) if args.no_cuda else cuda_usage(archs)
    if cuda_rows:
        print("\nCUDA kernels of the built extension (spill = stack + local bytes; dynamic shared memory "
              "is set at launch and not shown):")
        _table(cuda_rows, sys.stdout)
    elif cuda_note:
        print(f"\n{cuda_note}")
    for e in grid_errors:
        print(f"grid: {e}")
    failed = sum(r.error is not None for r in results)
    spilling = sum(bool(r.spill_bytes) for r in results) + sum(bool(r.spill_bytes) for r in cuda_rows)
    over = sum(r.over_shared for r in results)
    elapsed = time.perf_counter() - started
    print(f"compile-check: {len(results)} configs, {failed} failed, {spilling} spilling, {over} over shared memory"
          f" ({len(grid_errors)} grids over CUDA's limits; {len(cuda_rows)} CUDA kernel rows; {elapsed:.0f} s)")
    return 1 if failed or over or grid_errors else 0
