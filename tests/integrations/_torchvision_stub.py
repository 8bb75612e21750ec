"""Test-only: lets ``import timm`` run where torchvision is not installed. Never part of genfast.

Why: timm requires torchvision and imports it at import time, but the only torchvision wheels pip
can get for torch 2.13 are built against CUDA torch. Beside the CPU build of torch their C++
extension cannot load, and torchvision 0.28 then fails at import (registering a fake kernel for
``torchvision::nms``, an op only that extension defines); worse, an installed torchvision is
imported by transformers' models too, so it would break every transformers test. So the test
environment installs timm without its dependencies and without torchvision.

``import_timm()`` imports timm with these modules in ``sys.modules`` for the duration of the
import only, then removes them: they provide exactly the names timm 1.0 imports at import time
(``timm.layers`` takes ``FrozenBatchNorm2d``, ``timm.data`` takes transforms, the interpolation
enum and dataset classes). timm's model code (the ViT under test) uses none of them; each class
raises if anything instantiates it. Optional imports timm guards itself (torchvision's FX feature
extraction, the newer datasets) are left out, so timm takes its own without-them path.
"""
from __future__ import annotations

import enum
import importlib.util
import sys
import types


def _unavailable(qualname: str) -> type:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{qualname} is a test-only stub (torchvision is not installed); the test touched it")

    return type(qualname.rpartition(".")[2], (), {"__init__": __init__, "__module__": qualname.rpartition(".")[0]})


# module -> the names timm imports from it at import time
_NAMES = {
    "torchvision": [],
    "torchvision.ops": [],
    "torchvision.ops.misc": ["FrozenBatchNorm2d"],
    "torchvision.transforms": ["ToTensor"],  # timm.data subclasses it
    "torchvision.transforms.functional": [],  # InterpolationMode, below
    "torchvision.datasets": ["CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"],
}


def _stub_modules() -> dict:
    modules = {}
    for name, attributes in _NAMES.items():
        module = types.ModuleType(name, "test-only stub of torchvision (see tests/integrations/_torchvision_stub.py)")
        module.__path__ = []  # a package, so its submodules resolve
        for attribute in attributes:
            setattr(module, attribute, _unavailable(f"{name}.{attribute}"))
        modules[name] = module
    # timm builds its interpolation-name tables from the members at import time.
    modules["torchvision.transforms.functional"].InterpolationMode = enum.Enum(
        "InterpolationMode", {m: m.lower() for m in ("NEAREST", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")})
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def import_timm():
    """``import timm`` with the real torchvision when it is installed, else with the stub."""
    if "timm" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import timm

        return timm
    stubs = _stub_modules()
    sys.modules.update(stubs)
    try:
        import timm
    finally:
        for name in stubs:  # nothing after this import sees a torchvision (transformers checks)
            sys.modules.pop(name, None)
    return timm
