"""The configuration of a ``grass-attribute`` store: :class:`CacheConfig`, the flags that ``cache`` records in
the store's ``cli.json`` so that later commands need only ``--store``, and the defaults chosen by measurement.

``cli.json`` is ``{"flags": {<every CacheConfig field>: value}, "corpus": {"documents", "sha256", "segments"}}``
(with --checkpoint also ``"checkpoints": [{"path", "fingerprint"}]``, one per checkpoint in flag order),
written with ``indent=1, sort_keys=True`` and a final newline. A field of OPTIONAL_KEYS is written only when it is
not None, and read as None when absent: stores written before it existed read back, and write, the same bytes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..store import StoreError, read_json
from .models import DEFAULT_MODEL, UsageError

# Matmul precision of the cache and query passes: chosen by the throughput and fidelity measurements
# (BENCHMARKS.md, the main job's precision rows).
DEFAULT_AUTOCAST = "auto"
# Raw IF scores by default (--normalize: unit-normalized gradients): chosen by the fact-tracing measurement
# (BENCHMARKS.md, the fact-tracing table).
DEFAULT_NORMALIZE = False
# The main job's attributed completion of each question (`demo --answer`): the planted fact's answer, chosen by the
# fact-tracing measurement (BENCHMARKS.md, "The fact's own answer attributed"), or the model's own.
ANSWERS = ("true", "own")
DEFAULT_ANSWER = ANSWERS[0]
# --compile auto compiles the cache step when the documents to compute hold at least this many real tokens,
# by the matmul precision (--autocast, resolved): the measured break-even of one compile of the in-backward
# step on SmolLM2, rounded up (BENCHMARKS.md, "compile or not").
COMPILE_MIN_TOKENS = {"bfloat16": 100_000, "float16": 100_000, "none": 300_000}

CLI_JSON = "cli.json"
# --checkpoint model: the --model's own weights as one of the checkpoints (a folder named "model": ./model)
MODEL_CHECKPOINT = "model"


@dataclass(frozen=True)
class CacheConfig:
    """The flags of ``grass-attribute cache`` that a store records (the field names are the flags' names with
    underscores; the defaults are the flags' defaults). ``layers`` is held as a tuple, written as a list."""

    model: str = DEFAULT_MODEL
    gguf_file: str | None = None
    adapter: str | None = None
    corpus: str | None = None
    dataset: str | None = None
    split: str | None = None
    text_field: str = "text"
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None
    limit: int | None = 96
    layers: tuple[str, ...] | None = None
    compressor: str = "factgrass:blowup=4"
    k: int = 256
    max_length: int = 128
    batch_size: int = 4
    token_batch_size: int | None = None
    dtype: str = "float32"
    autocast: str = DEFAULT_AUTOCAST
    storage_dtype: str = "float32"
    # relative: the old absolute 1e-3 was a median 0.005 x each block's mean eigenvalue on the main job, and with
    # --optimizer-state (gradients 1e3-1e5 x larger) it left the FIM almost undamped (BENCHMARKS.md, issue 19)
    damping: float | str = "0.005*mean"
    seed: int = 0
    masks: str = "energy"
    mask_documents: int = 32
    optimizer_state: str | None = None
    optimizer_power: float | None = None  # None: the default power 1 (TrackStar's)
    checkpoint: tuple[str, ...] | None = None
    checkpoint_weight: tuple[float, ...] | None = None
    preconditioner: str | None = None
    curvature_documents: int | None = None

    def __post_init__(self):
        for key in ("layers", "checkpoint", "checkpoint_weight"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, key, tuple(value))

    @property
    def power(self) -> float:
        """--optimizer-power as the Attributor takes it (None: the default, 1), checked: a value that is not a number > 0
        (a cli.json written by hand), or one without --optimizer-state, is a UsageError naming the flag."""
        from ..optimizer_state import DEFAULT_POWER, check_power

        if self.optimizer_power is None:
            return DEFAULT_POWER
        if self.optimizer_state is None:
            raise UsageError(f"--optimizer-power {self.optimizer_power!r} without --optimizer-state: it is the power of "
                             "that state's division by sqrt(v) + eps")
        try:
            return check_power(self.optimizer_power)
        except ValueError as err:
            raise UsageError(f"--optimizer-power: {err}") from None

    @property
    def layer_patterns(self) -> list[str] | None:
        """--layers as a list (None: the default layers)."""
        return None if self.layers is None else list(self.layers)

    @classmethod
    def from_dict(cls, values: dict) -> CacheConfig:
        return cls(**{key: values[key] for key in CACHE_KEYS if key in values or key not in OPTIONAL_KEYS})

    @classmethod
    def from_args(cls, args) -> CacheConfig:
        """The configuration of parsed ``cache`` (or ``demo``) arguments."""
        return cls(**{key: getattr(args, key) for key in CACHE_KEYS})

    def as_dict(self) -> dict:
        """The flags as cli.json records them (``layers`` as a list)."""
        values = asdict(self)
        values.update({key: list(getattr(self, key)) for key in ("layers", "checkpoint", "checkpoint_weight")
                       if getattr(self, key) is not None})
        return {key: value for key, value in values.items() if value is not None or key not in OPTIONAL_KEYS}

    def differing(self, other: CacheConfig) -> list[str]:
        """The fields whose values differ from ``other``'s, apart from the ones that grow a store (GROWABLE_KEYS)."""
        return [key for key in CACHE_KEYS if key not in GROWABLE_KEYS and getattr(self, key) != getattr(other, key)]

    def check_corpus_flags(self) -> None:
        """The corpus flags go together (checked before the model is loaded)."""
        if self.dataset is not None:
            if self.corpus is not None:
                raise UsageError("give --corpus or --dataset, not both")
            if self.messages_field and (self.prompt_field or self.completion_field):
                raise UsageError("--messages-field excludes --prompt-field and --completion-field: give chat messages or "
                                 "prompt/completion pairs")
            if bool(self.prompt_field) != bool(self.completion_field):
                raise UsageError("--prompt-field and --completion-field go together")
        elif any((self.prompt_field, self.completion_field, self.messages_field, self.split)):
            raise UsageError("--prompt-field, --completion-field, --messages-field and --split apply to --dataset")

    @classmethod
    def read(cls, store: str | Path) -> tuple[CacheConfig, dict]:
        """(configuration, corpus record) of the store's cli.json; a record of another version is a StoreError."""
        path = Path(store) / CLI_JSON
        record = read_json(path, "CLI configuration")
        flags = record.get("flags") if isinstance(record, dict) else None
        corpus = record.get("corpus") if isinstance(record, dict) else None
        if not isinstance(flags, dict) or not isinstance(corpus, dict):
            raise StoreError(f"{path}: not a grass-attribute configuration (flags {list(CACHE_KEYS)} and corpus)")
        if not set(CACHE_KEYS) - set(OPTIONAL_KEYS) <= set(flags) <= set(CACHE_KEYS):
            missing = sorted(set(CACHE_KEYS) - set(OPTIONAL_KEYS) - set(flags))
            unknown = sorted(set(flags) - set(CACHE_KEYS))
            raise StoreError(f"{path}: written by another version of grass-attribute (flags missing: {missing}, "
                             f"unknown: {unknown}); cache into a new --store")
        return cls.from_dict(flags), corpus

    def record_text(self, corpus: dict, checkpoints: list[dict] | None = None) -> str:
        """The text of cli.json for this configuration, the corpus record and the checkpoints' (None: none)."""
        record = {"flags": self.as_dict(), "corpus": corpus, **({"checkpoints": checkpoints} if checkpoints else {})}
        return json.dumps(record, indent=1, sort_keys=True) + "\n"


def recorded_checkpoints(store: str | Path) -> list[dict] | None:
    """The checkpoints' record of the store's cli.json ([{"path", "fingerprint"}]; None: no cli.json or none)."""
    path = Path(store) / CLI_JSON
    if not path.is_file():
        return None
    record = read_json(path, "CLI configuration")
    found = record.get("checkpoints") if isinstance(record, dict) else None
    if found is not None and not (isinstance(found, list) and all(isinstance(c, dict) for c in found)):
        raise StoreError(f"{path}: its checkpoints record is not a list of {{path, fingerprint}}")
    return found


CACHE_KEYS = tuple(f.name for f in fields(CacheConfig))
# Fields added after stores were written: absent from cli.json when None (the bytes of older stores unchanged).
OPTIONAL_KEYS = ("adapter", "optimizer_state", "optimizer_power", "checkpoint", "checkpoint_weight", "preconditioner",
                 "curvature_documents")
# Cache flags that may differ on an existing store: a larger --limit grows it (new documents, new shards).
GROWABLE_KEYS = ("limit",)
