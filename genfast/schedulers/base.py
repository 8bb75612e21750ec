"""What every genfast scheduler shares: the diffusers-compatible config, the step index
bookkeeping (host ints, never a device sync), the per-device coefficient tables, noise drawn
as diffusers draws it, and the one ``sampler_step`` call a step is.

A scheduler computes, in ``set_timesteps``, a float64 table of sampler_step coefficient rows
(``self._rows``: (steps, variants, NUM_STEP_COEFS); a variant is e.g. Heun's second stage or
DPM-Solver's first-order step) and keeps a float32 copy on the device. ``step`` picks the row
with python ints, draws the noise if diffusers would, and launches ``sampler_step`` once.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Optional

import numpy as np
import torch

from ..reference.diffusion import (AUX_MODEL, AUX_SAMPLE, AUX_X0, NUM_STEP_COEFS,
                                   PREV_MODEL, PREV_SAMPLE, PREV_X0, X0_FROM_MODEL, X0_FROM_SAMPLE)
from ..ops._validate import ValidatedSignatures
from . import _ops

# (sample, model_output) signatures that passed SchedulerMixin._check_tensors.
_CHECKED_PAIRS = ValidatedSignatures()

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# the genfast schedulers among diffusers' KarrasDiffusionSchedulers (their _compatibles)
KARRAS_COMPATIBLES = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                      "HeunDiscreteScheduler", "DPMSolverMultistepScheduler")


# ----------------------------------------------------------------------------- config


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (like diffusers' FrozenDict)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Every key is also an instance attribute: a step reads several config values, and an
        # attribute found by __getattr__ (after a failed normal lookup) costs about 1 us each.
        self.__dict__.update(self)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; create a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = pop = popitem = setdefault = update = clear = _readonly

    def __reduce__(self):
        # pickle / copy.deepcopy would refill a dict subclass item by item (read-only here)
        return type(self), (dict(self),)


def register_to_config(init):
    """Decorator of a scheduler ``__init__``: records every parameter (defaults filled in) as the
    config, and ``_use_default_values`` (the ones not passed), as diffusers does, so a config
    converts between scheduler classes the same way."""
    signature = inspect.signature(init)
    names = [n for n in signature.parameters if n != "self"]

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        hidden = {k: v for k, v in kwargs.items() if k.startswith("_")}
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        unknown = set(kwargs) - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected config argument(s) {sorted(unknown)}")
        bound = signature.bind(self, *args, **kwargs)
        passed = set(bound.arguments) - {"self"}
        bound.apply_defaults()
        config = {n: bound.arguments[n] for n in names}
        defaulted = [n for n in names if n not in passed]
        if defaulted:
            config["_use_default_values"] = defaulted
        self._internal_dict = FrozenConfig({**hidden, **config})
        init(self, *args, **kwargs)

    return wrapper


class ConfigMixin:
    config_name = "scheduler_config.json"

    @property
    def config(self) -> FrozenConfig:
        return self._internal_dict

    def register_to_config(self, **kwargs) -> None:
        self._internal_dict = FrozenConfig({**self._internal_dict, **kwargs})

    @classmethod
    def _init_keys(cls) -> list:
        return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build from a config dict (a diffusers FrozenDict, another scheduler's ``.config``, or an
        object with a ``.config``); ``kwargs`` override it. Keys the source left at their default
        (``_use_default_values``) take this class's default, as in diffusers; keys this class does
        not have are kept in the config (hidden) but not used."""
        if config is None:
            raise ValueError(f"{cls.__name__}.from_config: pass a config dict (e.g. pipe.scheduler.config)")
        if not isinstance(config, dict) and isinstance(getattr(config, "config", None), dict):
            config = config.config
        if not isinstance(config, dict):
            raise TypeError(f"{cls.__name__}.from_config: config must be a dict or FrozenDict, "
                            f"got {type(config).__name__}")
        defaults = set(config.get("_use_default_values", []))
        original = {k: v for k, v in config.items() if k not in defaults and k != "_use_default_values"}
        expected = cls._init_keys()
        init = {}
        for key in expected:
            if key in kwargs:
                init[key] = kwargs.pop(key)
            elif key in original:
                init[key] = original[key]
        scheduler = cls(**init)
        hidden = {k: v for k, v in original.items() if k not in init}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler.register_to_config(**hidden)
        if return_unused_kwargs:
            unused = {**{k: v for k, v in original.items() if k not in expected}, **kwargs}
            return scheduler, unused
        return scheduler

    def save_config(self, save_directory, push_to_hub: bool = False) -> None:
        """Write ``scheduler_config.json`` (diffusers' format: the config and ``_class_name``) into
        ``save_directory``; diffusers' ``from_pretrained`` of the same class reads it too."""
        if push_to_hub:
            raise NotImplementedError(f"{type(self).__name__}.save_pretrained: push_to_hub is not supported; save to a "
                                      "directory and upload it with huggingface_hub.upload_folder")
        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(f"{type(self).__name__}.save_pretrained: save_directory must be a path, got "
                            f"{type(save_directory).__name__}")
        if os.path.isfile(save_directory):
            raise ValueError(f"{type(self).__name__}.save_pretrained: save_directory {os.fspath(save_directory)!r} "
                             "is a file, not a directory")
        os.makedirs(save_directory, exist_ok=True)
        data = {k: v for k, v in self.config.items() if k != "_use_default_values"}
        data["_class_name"] = type(self).__name__
        with open(os.path.join(save_directory, self.config_name), "w") as f:
            json.dump(data, f, indent=2, sort_keys=True,
                      default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))

    save_pretrained = save_config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs):
        """Build from the ``scheduler_config.json`` in a local directory (a diffusers or genfast
        save; ``subfolder`` e.g. "scheduler" for a pipeline's folder); ``kwargs`` as in
        ``from_config``. A Hub repo: ``cls.from_config(diffusers_class.load_config(repo, subfolder=...))``."""
        path = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or "", cls.config_name)
        if not os.path.isfile(path):
            raise ValueError(f"{cls.__name__}.from_pretrained: no {cls.config_name} at {path!r}; "
                             "genfast schedulers load from a local directory "
                             "(for a Hub repo: from_config(<diffusers class>.load_config(repo)))")
        with open(path) as f:
            return cls.from_config(json.load(f), **kwargs)


def check_choice(cls_name: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{cls_name}: config {key} must be one of {tuple(allowed)}, got {value!r}")


# ----------------------------------------------------------------------------- outputs


class SchedulerOutput:
    """``prev_sample`` (and ``pred_original_sample`` / ``denoised`` where diffusers has it).
    Indexable like diffusers' BaseOutput: ``out[0]`` is prev_sample."""

    _fields = ("prev_sample",)

    def __init__(self, prev_sample=None, **values):  # one per step: the common field set directly
        self.prev_sample = prev_sample
        for name in self._fields[1:]:
            setattr(self, name, values.get(name))

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, n) for n in self._fields if getattr(self, n) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def keys(self):
        return [n for n in self._fields if getattr(self, n) is not None]

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self.keys())})"


class SampleOutput(SchedulerOutput):
    _fields = ("prev_sample", "pred_original_sample")

    def __init__(self, prev_sample=None, pred_original_sample=None):  # one per step: no loop over the fields
        self.prev_sample, self.pred_original_sample = prev_sample, pred_original_sample


class LCMSchedulerOutput(SchedulerOutput):
    _fields = ("prev_sample", "denoised")


# ----------------------------------------------------------------------------- noise


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """diffusers.utils.torch_utils.randn_tensor: same generator use, shape, device and dtype, so
    the noise is bit-identical (a CPU generator draws on the CPU and copies; a list of
    generators draws one batch entry each)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type and gen_type == "cuda":
            raise ValueError(f"generator: cannot draw a {device} tensor from a {gen_type} generator")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {shape[0]}")
        one = (1,) + tuple(shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


# ----------------------------------------------------------------------------- scheduler base


def fold_x0(rows: np.ndarray) -> np.ndarray:
    """Substitute x0 = X0_FROM_SAMPLE x + X0_FROM_MODEL m into the prev and aux columns (exact
    when x0 is not clamped; one rounding less than forming x0 first)."""
    rows = rows.copy()
    a, b = rows[..., X0_FROM_SAMPLE], rows[..., X0_FROM_MODEL]
    for x0_col, s_col, m_col in ((PREV_X0, PREV_SAMPLE, PREV_MODEL), (AUX_X0, AUX_SAMPLE, AUX_MODEL)):
        c = rows[..., x0_col]
        rows[..., s_col] += c * a
        rows[..., m_col] += c * b
        rows[..., x0_col] = 0.0
    return rows


def new_rows(*shape) -> np.ndarray:
    return np.zeros(tuple(shape) + (NUM_STEP_COEFS,), dtype=np.float64)


class SchedulerMixin(ConfigMixin):
    """The base of every genfast scheduler. Subclasses fill, in ``set_timesteps``:
    ``self._timesteps_host`` (python numbers), ``self.timesteps`` (device tensor), ``self._rows``
    (float64 (steps, variants, 16)), and call ``self._finish_set_timesteps(device)``.

    Named as diffusers names its own: diffusers' pipeline loader finds a component's base class by
    this name in the component's library (``genfast.schedulers``, see ``_diffusers``)."""

    order = 1
    # genfast classes that take this one's config, as diffusers' _compatibles (KarrasDiffusionSchedulers)
    _compatibles = ()

    @property
    def compatibles(self) -> list:
        """The genfast scheduler classes that ``from_config(self.config)`` makes sensibly."""
        from .. import schedulers
        return [getattr(schedulers, name) for name in sorted({type(self).__name__, *self._compatibles})]
    _has_step_counter = True  # diffusers keeps a _step_index (all but DDPM/DDIM)

    def __init__(self):
        self.num_inference_steps = None
        self._rows = None
        self._tables = {}
        self._extra_rows = {}
        self._timesteps_host = None
        self._timesteps_facts = None  # see _view_index
        self._step_index = None
        self._begin_index = None

    # -- index bookkeeping (host only) -------------------------------------------------------

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _finish_set_timesteps(self, device) -> None:
        self._tables = {}
        self._extra_rows = {}
        self._step_index = None
        self._begin_index = None
        # A pipeline calls set_timesteps with the same arguments for every image: the index and
        # the coefficient tables of a schedule already seen are reused (keyed by content).
        memo = self.__dict__.setdefault("_schedule_memo", {})
        key = ("index", tuple(self._timesteps_host))
        self._index_of = memo.get(key)
        if self._index_of is None:
            self._index_of = {}
            for i, t in enumerate(self._timesteps_host):
                self._index_of.setdefault(t, []).append(i)
            self._remember(memo, key, self._index_of)
        self._table(torch.device(device) if device is not None else torch.device("cpu"), torch.float32)

    @staticmethod
    def _remember(memo: dict, key, value) -> None:
        if len(memo) >= 16:  # a few schedules (step counts, devices): no unbounded growth
            memo.clear()
        memo[key] = value

    def _require_timesteps(self, what: str) -> None:
        if self._rows is None:
            raise ValueError(f"{type(self).__name__}.{what}: call set_timesteps(num_inference_steps) first")

    def _table(self, device: torch.device, dtype: torch.dtype, rows_key=None) -> torch.Tensor:
        """The coefficient table on ``device`` (float32; float64 for float64 samples), made once
        per device (``rows_key``: another row set, e.g. DDIM's for an eta other than 0)."""
        return self._table_and_rows(device, dtype, rows_key)[0]

    def _table_and_rows(self, device: torch.device, dtype: torch.dtype, rows_key=None) -> tuple:
        """(table, its rows as views, variants per step): one unbind makes every row's view at
        once, cheaper than indexing the table in each step."""
        key = (rows_key, device, dtype)  # "cuda" and "cuda:0" are two keys: at worst one table more
        entry = self._tables.get(key)
        if entry is None:
            rows = self._rows if rows_key is None else self._extra_rows[rows_key]
            memo = self.__dict__.setdefault("_schedule_memo", {})
            content = ("table", rows.shape, rows.tobytes(), device, dtype)  # the kernels only read tables
            entry = memo.get(content)
            if entry is None:
                table = torch.tensor(rows, dtype=dtype).to(device)
                entry = (table, table.reshape(-1, table.shape[-1]).unbind(0), table.shape[1])
                self._remember(memo, content, entry)
            self._tables[key] = entry
        return entry

    def _lookup(self, value, first: bool) -> int:
        """Index of a timestep value in the schedule (the first, or diffusers' choice for the
        first step of a counter scheduler: the second when it appears twice)."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        hits = self._index_of.get(value)
        if hits is None and isinstance(value, int):
            hits = self._index_of.get(float(value))
        if not hits:
            T = self.config.num_train_timesteps
            where = "out of range [0, %d)" % T if not (0 <= value < T) else "not in the schedule"
            raise ValueError(f"{type(self).__name__}.step: timestep {value!r} is {where}; the schedule is "
                             f"{self._timesteps_host[:4]}...{self._timesteps_host[-2:]} "
                             f"({len(self._timesteps_host)} steps)")
        return hits[0] if first or len(hits) == 1 else hits[1]

    def _view_index(self, timestep: torch.Tensor) -> Optional[int]:
        """If ``timestep`` is an element of ``self.timesteps`` (iterating the schedule yields such
        views), its index, read from its address: no device access (and no storage objects;
        ``self.timesteps``' own facts are read once per tensor: this runs in every step)."""
        ts = self.timesteps
        facts = self._timesteps_facts
        try:
            # The same tensor at the same address (a copy or an unpickled scheduler has its own).
            if facts is None or facts[0] is not ts or facts[1] != ts.data_ptr():
                facts = self._timesteps_facts = self._facts_of(ts, len(self._timesteps_host or ()))
            _, base, n, size, dtype, device = facts
            if not base or timestep.ndim or timestep.dtype != dtype or timestep.device != device:
                return None
            offset = timestep.data_ptr() - base
        except Exception:  # not a tensor, or no storage (fake or functional tensors)
            return None
        i = offset // size
        return i if 0 <= i < n and not offset % size else None

    @staticmethod
    def _facts_of(ts, steps: int) -> tuple:
        """(ts, its address, length, element size, dtype, device); address 0 (no index from
        addresses) unless it is a 1-D tensor with unit stride as long as the schedule: one a
        caller cut (``s.timesteps = s.timesteps[k:]``) has other indices than the schedule."""
        if type(ts) is not torch.Tensor or ts.ndim != 1 or ts.stride(0) != 1 or ts.shape[0] != steps:
            return (ts, 0, 0, 1, None, None)
        return (ts, ts.data_ptr(), ts.shape[0], ts.element_size(), ts.dtype, ts.device)

    def _index_from_timestep(self, timestep, first_lookup: bool) -> int:
        """Host-only where possible: a view of self.timesteps or a number; a CPU tensor is read
        on the host; only a device tensor that is not a view costs one sync."""
        if isinstance(timestep, torch.Tensor):
            i = self._view_index(timestep)
            if i is not None:
                return i
            if timestep.numel() != 1:
                raise ValueError(f"{type(self).__name__}.step: timestep must be a scalar, "
                                 f"got shape {tuple(timestep.shape)}")
            timestep = timestep.reshape(()).item()  # CPU: no device sync; device: once per loop
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float, np.integer, np.floating)):
            raise TypeError(f"{type(self).__name__}.step: timestep must be a number or a tensor, "
                            f"got {type(timestep).__name__}")
        return self._lookup(timestep.item() if isinstance(timestep, (np.integer, np.floating)) else timestep,
                            first_lookup)

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            self._step_index = self._index_from_timestep(timestep, first_lookup=False)

    def _current_index(self, timestep) -> int:
        """The step index this call works on (python int)."""
        self._require_timesteps("step")
        n = len(self._timesteps_host)
        if not self._has_step_counter:
            # DDPM/DDIM are stateless in diffusers: the timestep says where we are. A device
            # tensor that is not a view of self.timesteps uses the counter (one sync to start it).
            if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu" \
                    and self._view_index(timestep) is None and self._step_index is not None and self._step_index < n:
                return self._step_index
            return self._index_from_timestep(timestep, first_lookup=True)
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= n:
            raise ValueError(f"{type(self).__name__}.step: all {n} steps of the schedule are done; "
                             "call set_timesteps again")
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            if self._lookup_ok(timestep, i) is False:
                raise ValueError(f"{type(self).__name__}.step: timestep {timestep!r} is not step {i} of the schedule "
                                 f"(expected {self._timesteps_host[i]!r})")
        return i

    def _lookup_ok(self, value, i: int) -> bool:
        return float(value) == float(self._timesteps_host[i])

    # -- the step ------------------------------------------------------------------------------

    @staticmethod
    def _check_tensors(name: str, model_output, sample, model_channels_factor: int = 1) -> None:
        key = None
        if type(sample) is torch.Tensor and type(model_output) is torch.Tensor and not torch.compiler.is_compiling():
            # A sampling loop passes one (sample, model_output) signature every step: checked once.
            key = (sample.shape, model_output.shape, sample.dtype, model_output.dtype, sample.device,
                   model_output.device, model_channels_factor)
            if key in _CHECKED_PAIRS:
                return
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError(f"{name}.step: model_output and sample must be tensors, got "
                            f"{type(model_output).__name__} and {type(sample).__name__}")
        if not sample.is_floating_point() or not model_output.is_floating_point():
            raise TypeError(f"{name}.step: model_output and sample must be floating point, got "
                            f"{model_output.dtype} and {sample.dtype}")
        if model_output.device != sample.device:
            raise ValueError(f"{name}.step: model_output is on {model_output.device} but sample on {sample.device}")
        expected = tuple(sample.shape)
        if model_channels_factor != 1 and sample.ndim >= 2:
            expected = (sample.shape[0], sample.shape[1] * model_channels_factor) + tuple(sample.shape[2:])
        if tuple(model_output.shape) != tuple(sample.shape) and tuple(model_output.shape) != expected:
            raise ValueError(f"{name}.step: model_output shape {tuple(model_output.shape)} does not match sample "
                             f"shape {tuple(sample.shape)}")
        if key is not None:
            _CHECKED_PAIRS.add(key)

    def _threshold_bound(self, row: np.ndarray, sample, model_output) -> torch.Tensor:
        """Dynamic thresholding (Imagen): per-sample ratio-quantile of |x0|, clamped to
        [1, sample_max_value]; x0 formed in float32 from the row's two x0 coefficients."""
        cfg = self.config
        cd = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x0 = sample.to(cd) * float(row[X0_FROM_SAMPLE]) + model_output.to(cd) * float(row[X0_FROM_MODEL])
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), cfg.dynamic_thresholding_ratio, dim=1)
        return torch.clamp(s, min=1, max=cfg.sample_max_value)

    def _run(self, i: int, variant: int, sample, model_output, history=None, history2=None, noise=None,
             clip: Optional[float] = None, threshold: bool = False, out_dtype=None, aux_dtype=None, rows_key=None):
        """One sampler_step with row (i, variant): the whole arithmetic of the step."""
        cd = torch.float64 if sample.dtype == torch.float64 else torch.float32
        _, rows, variants = self._table_and_rows(sample.device, cd, rows_key)
        coefs = rows[i * variants + variant]  # a view: no launch
        x0_clamp, rescale = None, False
        if threshold:
            rows = self._rows if rows_key is None else self._extra_rows[rows_key]
            x0_clamp, rescale = self._threshold_bound(rows[i, variant], sample, model_output), True
        elif clip is not None:
            x0_clamp = float(clip)
        else:  # a sampling loop's usual step: the fast path of one signature (None where it does not apply)
            result = _ops.sampler_step_in_loop(sample, model_output, coefs, history, history2, noise, out_dtype,
                                               aux_dtype)
            if result is not None:
                return result
        return _ops.sampler_step(sample, model_output, coefs, history=history, history2=history2, noise=noise,
                                 x0_clamp=x0_clamp, x0_rescale=rescale, out_dtype=out_dtype, aux_dtype=aux_dtype)

