"""Builds and routes the CUDA emulation modules (see cuda_emulation.h) for the tests.

``build(family)`` compiles tests/cuda_emulation/<family>_emulated.cpp (the family's
kernels/<family>.cu and real csrc/<family>_bindings.cpp over the SIMT emulator) with
``nvcc -x c++`` into a Python module, once per version of its sources, into the temp dir.
A test session usually needs every family's module, so the first call also starts the
others' builds in the background, as many at a time as there are cores.
``route_cuda_backend(monkeypatch, module)`` then points genfast's own CUDA backend code (the
functions registered as "cuda" in genfast/ops/<family>.py) at it, on CPU tensors.

Adding a family: launch its kernels through cuda::launch_kernel (kernels/cuda_common.cuh),
declare dynamic shared memory with GF_DYNAMIC_SHARED, skip cuda::DeviceGuard under
GENFAST_CUDA_EMULATION; write <family>_emulated.cpp here (the .cu, the bindings, stubs for the
CPU entry points); test with ``build(family)`` + ``route_cuda_backend`` + ``backend="cuda"``.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import importlib.util
import mmap
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "cuda_emulation"


def families() -> list:
    return sorted(p.name[: -len("_emulated.cpp")] for p in HERE.glob("*_emulated.cpp"))


def sources(family: str) -> list:
    """Every file the module's build reads (its cache key)."""
    files = [HERE / f"{family}_emulated.cpp", ROOT / "kernels" / "cuda_common.cuh"]
    files += [p for p in [ROOT / "csrc" / f"{family}_bindings.cpp"] if p.exists()]  # checks_emulated has none
    files += (sorted(HERE.glob("*.h")) + sorted((ROOT / "kernels").glob(f"{family}*"))
              + sorted((ROOT / "csrc").glob("*.h")))
    return files


def target(family: str) -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources(family))).hexdigest()[:16]
    return (Path(tempfile.gettempdir()) / f"genfast-cuda-emulation-{digest}"
            / f"{family}_emulated{sysconfig.get_config_var('EXT_SUFFIX')}")


class _Job:
    """One background compilation into a temporary file, renamed to the target when it succeeds."""

    def __init__(self, family: str, nvcc: str, pybind11_include: str):
        self.family, self.target = family, target(family)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.target.with_name(f"{self.target.name}.{os.getpid()}.building")
        self.log = self.partial.with_suffix(".log")
        cmd = [nvcc, "-x", "c++", "-std=c++17", "-O1", "-shared", "-Xcompiler", "-fPIC",
               f"-I{ROOT / 'kernels'}", f"-I{ROOT / 'csrc'}", f"-I{HERE}", f"-I{pybind11_include}",
               f"-I{sysconfig.get_paths()['include']}", str(HERE / f"{family}_emulated.cpp"), "-o", str(self.partial)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def finish(self) -> str | None:
        """Renames the result into place; returns the compiler's complaint when it failed."""
        error = None
        if self.process.returncode == 0:
            self.partial.replace(self.target)
        else:
            error = f"building the CUDA emulation of {self.family} failed:\n{self.log.read_text()[-4000:]}"
            self.partial.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)
        return error

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.partial.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)


_running: dict = {}  # family -> _Job
_failed: dict = {}  # family -> the compiler's output


def _reap() -> None:
    for family, job in list(_running.items()):
        if job.process.poll() is not None:
            del _running[family]
            error = job.finish()
            if error:
                _failed[family] = error


def _start(family: str, nvcc: str, pybind11_include: str) -> None:
    if family not in _running and family not in _failed and not target(family).exists():
        _running[family] = _Job(family, nvcc, pybind11_include)


@atexit.register
def _stop_background_builds() -> None:
    _reap()  # keep what finished
    for job in _running.values():
        job.kill()
    _running.clear()


def build(family: str):
    """The family's emulation module, compiled if this version of its sources has not been."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA emulation tests compile the kernels' source with it")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 not installed (it is in the test extra)")
    cores = os.cpu_count() or 1
    _start(family, nvcc, pybind11.get_include())
    while family in _running:
        _reap()
        for other in families():  # keep the cores busy with the builds the next tests will want
            if len(_running) >= cores:
                break
            _start(other, nvcc, pybind11.get_include())
        if family in _running:
            if time.monotonic() - _running[family].started > 900:
                raise AssertionError(f"building the CUDA emulation of {family} took more than 15 minutes")
            time.sleep(0.1)
    if family in _failed:
        raise AssertionError(_failed[family])
    spec = importlib.util.spec_from_file_location(f"{family}_emulated", target(family))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PAGE = mmap.PAGESIZE


def guarded_bytes(nbytes: int):
    """A uint8 CPU tensor of ``nbytes`` whose end, rounded up to 16 bytes (so the start keeps
    the 16-byte alignment of the kernels' vector paths), touches a PROT_NONE page: a read or
    write past it is a segmentation fault, as an out-of-bounds access is on a GPU (often)."""
    import torch

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    padded = (nbytes + 15) // 16 * 16
    pages = max(1, -(-padded // _PAGE))
    region = mmap.mmap(-1, (pages + 1) * _PAGE)  # freed with the last tensor viewing it
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    if libc.mprotect(base + pages * _PAGE, _PAGE, 0) != 0:  # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=pages * _PAGE - padded)


class GuardedPointers:
    """While installed, ``Tensor.data_ptr()`` of a CPU tensor answers an address in a copy of its
    storage that ends at a guard page (guarded_bytes), refreshed from the tensor at each call;
    ``flush()`` (after every extension call) copies the bytes written there back into the
    tensor. The bindings take raw addresses, so this is how every pointer the backend passes to
    the emulated kernels points into guarded memory: an out-of-bounds global read or write
    faults. Tensors sharing a storage share its copy (aliasing is kept); copies live as long as
    the routing (an address kept in a parameter dict stays valid)."""

    def __init__(self):
        import torch

        self.real_data_ptr = torch.Tensor.data_ptr
        self.copies = {}  # storage address -> (original bytes, guarded bytes, snapshot of guarded)

    def data_ptr(self, t):
        storage = t.untyped_storage()
        if t.device.type != "cpu" or storage.nbytes() == 0:
            return self.real_data_ptr(t)
        import torch

        key = storage.data_ptr()
        if key not in self.copies:
            original = torch.empty(0, dtype=torch.uint8).set_(storage)  # keeps the storage alive
            guarded = guarded_bytes(original.numel())
            self.copies[key] = (original, guarded, torch.empty_like(original))
        original, guarded, snapshot = self.copies[key]
        guarded.copy_(original)
        snapshot.copy_(original)
        return guarded.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()

    def flush(self):
        """The bytes written into the copies since the last flush go back into the originals
        (only those: the originals may have changed since their address was taken)."""
        for original, guarded, snapshot in self.copies.values():
            written = guarded != snapshot
            if bool(written.any()):
                original[written] = guarded[written]
                snapshot.copy_(guarded)


class EmulatedExtension:
    """Stands in for genfast._C: its CUDA functions (names containing "_cuda") and classes are the
    emulated module's, the functions counted (so a test can check the emulated kernels really ran); anything else is
    the real extension's. Every tensor argument of those calls is passed in storage that ends at
    a guard page (GuardedPointers): an out-of-bounds global read or write faults.
    The device index argument of a CPU tensor is None: passed as 0 (the emulator ignores it)."""

    def __init__(self, module, real, guard=None):
        self._module, self._real = module, real
        self.calls = {}
        self.guard = guard

    def __getattr__(self, name):
        # The module's own classes (option structs) too: its entry points take only those.
        if "_cuda" not in name and not isinstance(getattr(self._module, name, None), type):
            real = getattr(self._real, name)
            if self.guard is None or not callable(real):
                return real

            def call_real(*args, **kwargs):  # a CPU kernel may write through a guarded address too
                try:
                    return real(*args, **kwargs)
                finally:
                    self.guard.flush()

            return call_real
        fn = getattr(self._module, name)  # AttributeError: a function the module lacks

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if args and args[-1] is None:
                args = args[:-1] + (0,)
            try:
                return fn(*args, **kwargs)
            finally:
                if self.guard is not None:
                    self.guard.flush()

        return call


def route_cuda_backend(monkeypatch, module) -> EmulatedExtension:
    """Makes backend="cuda" run genfast's CUDA backend code on CPU tensors, with its kernel
    calls going to the emulated ``module``. Returns the stand-in extension (see its calls)."""
    import torch

    from genfast import _dispatch, _ext

    guard = GuardedPointers()
    extension = EmulatedExtension(module, _ext._C, guard)
    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda t: guard.data_ptr(t))
    monkeypatch.setattr(_ext, "_C", extension)
    monkeypatch.setattr(_ext, "stream_of", lambda t: 0)
    real_reason = _dispatch.backend_unavailable_reason

    def reason(backend, device):
        if backend == "cuda" and device.type == "cpu":
            return None
        return real_reason(backend, device)

    monkeypatch.setattr(_dispatch, "backend_unavailable_reason", reason)
    _poison_new_tensors(monkeypatch)
    return extension


def cuda_backend_fixtures(family: str, kernel: str | None = None):
    """The two fixtures of a CUDA emulation test module, bound to module names there:
    ``emulated, extension = build.cuda_backend_fixtures("vae", "vae_forward_cuda")``.
    ``emulated`` (module scope) is the family's compiled module; ``extension`` (autouse) routes
    backend="cuda" to it for each test and, after the test, asserts that ``kernel`` (any entry
    point when None) was called, so a test that silently ran another backend fails."""

    @pytest.fixture(scope="module")
    def emulated():
        return build(family)

    @pytest.fixture(autouse=True)
    def extension(emulated, monkeypatch):
        routed = route_cuda_backend(monkeypatch, emulated)
        yield routed
        ran = routed.calls.get(kernel, 0) > 0 if kernel else bool(routed.calls)
        assert ran, "the emulated CUDA kernels never ran"

    return emulated, extension


def _poison_new_tensors(monkeypatch) -> None:
    """torch.empty & co. return NaN-filled floating tensors (integer ones: their maximum), as
    device memory is never zeroed: an output element a kernel forgets to write shows up (the
    CPU allocator would otherwise often hand back a previous, correct result)."""
    import torch

    def poisoned(factory):
        def make(*args, **kwargs):
            t = factory(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype != torch.bool and not t.is_complex():
                t.fill_(torch.iinfo(t.dtype).max)
            return t

        return make

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
