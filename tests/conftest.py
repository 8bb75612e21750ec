import os

# Before anything imports triton: run Triton kernels on CPU tensors through the interpreter
# when there is no GPU, and never let the dispatcher hide a failing backend behind a fallback.
try:
    import torch as _torch

    _has_gpu = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["GENFAST_STRICT"] = "1"
os.environ.pop("GENFAST_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402


def _torchvision_extension_loads() -> bool:
    """Loads torchvision's C++ extension as ``torchvision.extension`` does, without importing
    torchvision; True when torchvision is absent (nothing to fix) or the extension loads."""
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    finder = importlib.machinery.FileFinder(
        os.path.dirname(spec.origin),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    extension = finder.find_spec("_C")
    if extension is None:
        return False
    try:
        torch.ops.load_library(extension.origin)
    except OSError:
        return False
    return True


# timm (a test dependency) requires torchvision, and the torchvision wheel pip resolves beside
# torch 2.13 is built against CUDA torch: its C++ extension cannot load beside the CPU build.
# torchvision 0.28 then fails at import, registering fake kernels for torchvision::nms and
# ::qnms, ops only that extension defines, and so does every library that imports an installed
# torchvision (timm, transformers' models). Only in that case: the two schemas, no kernels
# (calling them fails loudly); the rest of torchvision is pure Python and imports as it is.
_torchvision_schemas = None
if not _torchvision_extension_loads():
    _torchvision_schemas = torch.library.Library("torchvision", "DEF")  # kept: dropping it undefines them
    for _op in ("nms", "qnms"):
        _torchvision_schemas.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    from genfast.testing import fresh_seed

    s = fresh_seed()
    torch.manual_seed(s)
    return s
