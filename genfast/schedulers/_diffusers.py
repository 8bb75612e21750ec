"""Lets diffusers pipelines save and load genfast schedulers as they do their own, without
genfast importing diffusers.

What diffusers needs (read in 0.42's ``pipelines/pipeline_utils.py`` and ``pipeline_loading_utils.py``):

* ``DiffusionPipeline.save_pretrained`` saves a component only if its class derives from a base
  class that ``LOADABLE_CLASSES[library]`` names, for a library already imported; otherwise it
  writes ``[null, null]``. ``register`` adds library ``genfast.schedulers`` with base class
  ``SchedulerMixin`` (genfast's; diffusers looks base classes up by name in the library).
* The pipeline records a component as ``[library, class name]``; for a library it does not list
  by its top-level name, the library is the class's ``__module__``: the public scheduler classes
  say ``genfast.schedulers`` (set in ``__init__``), so model_index.json reads
  ``["genfast.schedulers", "DDIMScheduler"]`` whatever file defines the class.
* ``from_pretrained`` imports only the libraries it lists and otherwise takes the module from
  ``sys.modules`` (it never imports a module a repository names): ``import genfast`` first.

Listing top-level ``genfast`` in LOADABLE_CLASSES would make the pipeline record
``["genfast", class]`` and look the class up there: keep the library ``genfast.schedulers``.
Not covered: ``from_pretrained(repo, scheduler=<genfast scheduler>)`` for a checkpoint saved with
a diffusers scheduler (diffusers checks a passed component against the saved library's base
class, and refuses); load it, then ``pipe.scheduler = <class>.from_config(pipe.scheduler.config)``.

``install`` (run when genfast.schedulers is imported) registers at once if diffusers' loader is
imported, and otherwise the moment it is: pipelines exist only after that module has run, so
every pipeline sees the registration.
"""
from __future__ import annotations

import importlib.abc
import sys

LOADER_MODULE = "diffusers.pipelines.pipeline_loading_utils"
LIBRARY = "genfast.schedulers"
# base class name -> [save method, load method], as diffusers' LOADABLE_CLASSES entries
BASE_CLASSES = {"SchedulerMixin": ["save_pretrained", "from_pretrained"]}


def register(loading_utils) -> None:
    """Add genfast's schedulers to diffusers' ``LOADABLE_CLASSES`` (saving) and its flat copy
    ``ALL_IMPORTABLE_CLASSES`` (the load method by base-class name; diffusers has the same entry
    for its own SchedulerMixin)."""
    loading_utils.LOADABLE_CLASSES.setdefault(LIBRARY, {k: list(v) for k, v in BASE_CLASSES.items()})
    for name, methods in BASE_CLASSES.items():
        loading_utils.ALL_IMPORTABLE_CLASSES.setdefault(name, list(methods))


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the real loader, then ``register`` (delegates everything else to the real loader)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register(module)

    def __getattr__(self, name):  # get_source, get_code, resource readers, ...
        return getattr(self._loader, name)


class _DiffusersLoaderHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for diffusers' loader module only, wraps the spec another finder
    returns so that ``register`` runs right after the module does."""

    def find_spec(self, fullname, path, target=None):
        if fullname != LOADER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    if not any(isinstance(finder, _DiffusersLoaderHook) for finder in sys.meta_path):
        # kept after it fires: a re-import of diffusers (tests that purge sys.modules) registers again
        sys.meta_path.insert(0, _DiffusersLoaderHook())
    loading_utils = sys.modules.get(LOADER_MODULE)
    if loading_utils is not None and hasattr(loading_utils, "LOADABLE_CLASSES"):
        register(loading_utils)
