"""An Attributor's configuration: every argument but the model and its functions' checks on them,
validated and normalized once (:class:`AttributorConfig`)."""
from __future__ import annotations

import copy
import numbers
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from .fim import check_damping
from .optimizer_state import DEFAULT_EPS, DEFAULT_POWER, check_argument
from .preconditioners import check_task_weight, preconditioner_class, resolve_preconditioner
from .scoring import PRECONDITIONED
from .store import STORAGE_DTYPES
from .whitening import MASKS

METHODS = ("if", "graddot", "gradcos", "tracin", "trak")
FISHERS = ("empirical", "true", "true_sampled")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in [low, high) (high None: >= low); a TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


@dataclass
class AttributorConfig:
    """The Attributor's keyword arguments (see :class:`attribution.Attributor` for their meaning),
    checked on construction: a clear error naming the argument, else normalized values (``k`` an int,
    ``damping`` from :func:`check_damping`, ``preconditioner`` resolved, ``task_weight`` a float for
    "mixed" and None otherwise, ``autocast`` a dtype or None).
    ``damping`` may be changed afterwards (through ``Attributor.damping``, which checks it)."""

    method: str = "if"
    compressor: object = "factgrass"
    k: int = 4096
    damping: float | str = 1e-3
    store: str | Path | None = None
    layers: list[str] | str | None = None
    seed: int = 0
    device: torch.device | str | None = None
    dtype: torch.dtype = torch.float32
    checkpoints: list | None = None
    checkpoint_weights: list[float] | None = None
    output_fn: Callable | None = None
    fisher: str = "empirical"
    logits_fn: Callable | None = None
    compile: bool | str = True
    storage_dtype: str | None = None
    memory_budget: int = 1 << 30
    progress: bool = True
    params: list[str] | str | None = None
    param_compressor: object = "sjlt"
    param_chunk: int = 64
    preconditioner: str | None = None
    task_weight: float | None = None
    autocast: torch.dtype | str | None = None
    normalize: bool = False
    optimizer_state: object = None
    optimizer_eps: float = DEFAULT_EPS
    optimizer_power: float = DEFAULT_POWER
    whitening_masks: str = "energy"
    storage: str = field(init=False, default="float32")  # storage_dtype resolved for dtype

    def __post_init__(self):
        method, fisher = self.method, self.fisher
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if fisher != "empirical" and not callable(self.logits_fn):
            raise ValueError(f"fisher={fisher!r} needs a callable logits_fn(model, batch) -> Tensor[B, C]")
        if method == "trak" and not callable(self.output_fn):
            raise ValueError("method='trak' needs a callable output_fn(model, batch) -> Tensor[B] (the model-output function)")
        if method == "trak" and fisher != "empirical":
            raise ValueError("method='trak' preconditions with the empirical FIM of output_fn's gradients: fisher must "
                             "be 'empirical'")
        if method not in ("if", "trak") and fisher != "empirical":
            raise ValueError(f"fisher={fisher!r} only matters for method='if'")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {self.normalize!r}")
        if self.normalize and method == "trak":
            raise ValueError("normalize=True is for 'if', 'graddot' and 'tracin' ('gradcos' is normalized; TRAK weights "
                             "its own scores)")
        self.preconditioner = resolve_preconditioner(self.preconditioner, method, PRECONDITIONED)
        if preconditioner_class(self.preconditioner).needs_factors and fisher != "empirical":
            raise ValueError(f"preconditioner={self.preconditioner!r} uses the empirical Fisher (the training factors); "
                             f"fisher={fisher!r} is supported with preconditioner='fim'")
        self.task_weight = check_task_weight(self.task_weight, self.preconditioner)
        if self.preconditioner == "mixed" and fisher != "empirical":
            raise ValueError(f"preconditioner='mixed' mixes the empirical second moments of the training and the query "
                             f"gradients: fisher must be 'empirical', got {fisher!r}")
        self.k = check_int("k", self.k)
        self.seed = check_int("seed", self.seed, 0, 2**63)
        self.damping = check_damping(self.damping)
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")
        self.storage = self.storage_dtype or ("float64" if self.dtype == torch.float64 else "float32")
        if self.storage not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.storage!r}")
        self.memory_budget = check_int("memory_budget", self.memory_budget)
        self.param_chunk = check_int("param_chunk", self.param_chunk)
        self.autocast = AUTOCAST_DTYPES.get(self.autocast, self.autocast)
        if self.autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {self.autocast!r}")
        if self.store is not None and (not isinstance(self.store, (str, Path)) or not str(self.store)):
            raise TypeError(f"store must be None or a directory path, got {self.store!r}")
        if self.store is not None and Path(self.store).exists() and not Path(self.store).is_dir():
            raise ValueError(f"store {self.store} exists and is not a directory")
        if self.compile not in (True, False, "regional"):
            raise ValueError(f"compile must be True (the whole step), 'regional' (the repeated blocks) or False, got "
                             f"{self.compile!r}")
        if self.compile != "regional":
            self.compile = bool(self.compile)
        self.progress = bool(self.progress)
        self.optimizer_eps = check_argument(self.optimizer_state, self.optimizer_eps, self.optimizer_power)
        self.optimizer_power = float(self.optimizer_power)
        self._check_whitening()
        if self.optimizer_state is not None and preconditioner_class(self.preconditioner).needs_factors:
            raise ValueError(f"optimizer_state is not supported with preconditioner={self.preconditioner!r} (its "
                             "curvature comes from the unnormalized factors); use preconditioner 'fim' or 'none'")
        if (self.optimizer_state is not None and self.method in ("if", "trak") and isinstance(self.damping, float)
                and self.damping > 0 and self.preconditioner != "none"):
            warnings.warn(f"damping={self.damping!r} is absolute, and optimizer_state scales the gradients by "
                          "1 / (sqrt(v) + eps), often 1e3-1e5, so it hardly damps the preconditioner then (on the "
                          "main job MRR 0.19 against 0.61 at '0.005*mean'): give a relative damping '<f>*mean'",
                          UserWarning, stacklevel=3)

    def _check_whitening(self) -> None:
        whitened = preconditioner_class(self.preconditioner).whitened
        if self.whitening_masks not in MASKS:
            raise ValueError(f"whitening_masks must be one of {MASKS}, got {self.whitening_masks!r}")
        if not whitened:
            if self.whitening_masks != "energy":
                raise ValueError(f"whitening_masks applies to preconditioner 'kfac-whitened' / 'ekfac-whitened', not "
                                 f"{self.preconditioner!r}")
            return
        what = f"preconditioner={self.preconditioner!r}"
        if self.method != "if":
            raise ValueError(f"{what} whitens the loss gradients of method 'if'; method={self.method!r} is not supported")
        if self.fisher != "empirical":
            raise ValueError(f"{what} uses the empirical Fisher (the training factors); fisher={self.fisher!r} is not")
        if self.params:
            raise ValueError(f"{what} whitens target linear layers; params= blocks have no Kronecker factors (use "
                             "preconditioner 'fim' for them)")
        if self.optimizer_state is not None:
            raise ValueError(f"optimizer_state is not supported with {what} (its curvature comes from the unnormalized "
                             "factors); use preconditioner 'fim' or 'none'")

    @property
    def whitening_record(self) -> dict | None:
        """What a whitened store's rows depend on beyond the compressors (its manifest's "whitening"), or None."""
        if not preconditioner_class(self.preconditioner).whitened:
            return None
        return {"preconditioner": self.preconditioner, "damping": self.damping, "masks": self.whitening_masks}

    @classmethod
    def from_arguments(cls, arguments: dict, config: "AttributorConfig | None") -> "AttributorConfig":
        """The configuration of ``Attributor(..., **arguments)``, or a copy of ``config`` (an Attributor's
        damping setter changes only its own) when it is given and every argument is left at its default
        (a ValueError naming those that are not)."""
        names = [f.name for f in fields(cls) if f.init]
        if config is None:
            return cls(**{name: arguments[name] for name in names})
        if not isinstance(config, cls):
            raise TypeError(f"config must be an AttributorConfig, got {type(config).__name__}")
        given = [f.name for f in fields(cls) if f.init and arguments[f.name] is not f.default
                 and arguments[f.name] != f.default]
        if given:
            raise ValueError(f"give config= or keyword arguments, not both (also given: {given})")
        return copy.copy(config)

    @property
    def gradient_kind(self) -> str:
        """Whose per-sample gradients are cached and queried: "output" (TRAK's output_fn) or "loss"."""
        return "output" if self.method == "trak" else "loss"

    @property
    def normalized(self) -> bool:
        """Unit-normalized gradients on both sides (normalize=True, or gradcos)."""
        return self.normalize or self.method == "gradcos"


__all__ = ["AttributorConfig", "FISHERS", "METHODS", "check_int"]
