"""What the commands share: the usage error, the process's rank and device, the Attributor of a cache
configuration, and a cached store read back (its configuration and documents, checked)."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from ... import index as index_module
from ... import llm, process_group
from ... import optimizer_state as optimizer_module
from ...attributor import Attributor
from ...compression import parse_spec
from ...layers import find_layers
from ...store import StoreError, open_store, refuse_inside_store
from ..config import CLI_JSON, CacheConfig


class CLIError(SystemExit):
    """A usage error: printed as one line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(f"grass-attribute: error: {message}")


# bad input, or a store that cannot serve the request: one line on stderr, exit status 2 (else a traceback)
EXPECTED_ERRORS = (ValueError, FileNotFoundError, StoreError, FloatingPointError)


def main_rank() -> bool:
    """Whether this process prints and writes the outputs (rank 0 under torchrun)."""
    return process_group.rank_and_world()[0] == 0


def device() -> str:
    """cuda:LOCAL_RANK under torchrun with NCCL, else the CPU."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return str(process_group.local_device())
    return "cpu"


def load_model(config: CacheConfig):
    """(model, tokenizer) of the configuration, on this rank's device."""
    return llm.load_model(config.model, config.gguf_file, config.dtype, device=device())


def compressor_spec(config: CacheConfig, store: Path) -> str:
    """The compressor spec, with the store's data-aware masks for FactGraSS (--masks energy)."""
    name, options = parse_spec(config.compressor)
    if config.masks == "energy" and name == "factgrass" and "mask_dir" not in options:
        return f"{config.compressor}{',' if ':' in config.compressor else ':'}mask_dir={store / 'masks'}"
    return config.compressor


@functools.lru_cache(maxsize=1)
def _loaded_state(path: str, stamp: tuple):
    return optimizer_module.load(path)


def optimizer_state(config: CacheConfig):
    """The loaded --optimizer-state of a configuration (None without one; read once per file version), or a
    usage error naming the flag: a missing file, or one that holds no Adam/AdamW state."""
    path = config.optimizer_state
    if path is None:
        return None
    if not Path(path).is_file():
        raise CLIError(f"--optimizer-state {path}: no such file")
    stat = Path(path).stat()
    try:
        return _loaded_state(path, (stat.st_mtime_ns, stat.st_size))
    except ValueError as err:
        raise CLIError(f"--optimizer-state {path}: {err}") from None


def check_optimizer_state(model, config: CacheConfig) -> None:
    """--optimizer-state holds a second moment of every target layer's weight, in its shape (before the cache
    writes anything)."""
    state = optimizer_state(config)
    if state is None:
        return
    layers = find_layers(model, llm.resolve_layers(model, config.layer_patterns))
    try:
        optimizer_module.match(model, state, [optimizer_module.layer_parameter(model, i) for i in layers.values()])
    except ValueError as err:
        raise CLIError(f"--optimizer-state {config.optimizer_state}: {err}") from None


def attributor(model, config: CacheConfig, store, method="if", compile=False, normalize=False, preconditioner=None,
               task_weight=None):
    """The Attributor of a cache configuration over ``store`` (``preconditioner`` / ``task_weight``: the
    Attributor's, e.g. "mixed" and its weight: the store's FIM serves both); an error of its --optimizer-state
    (another model's state, or a store cached with another one) is a usage error naming the flag."""
    try:
        return Attributor(model, llm.sequence_loss, method=method, compressor=compressor_spec(config, Path(store)),
                          k=config.k, damping=config.damping, store=store,
                          layers=llm.resolve_layers(model, config.layer_patterns), seed=config.seed, compile=compile,
                          storage_dtype=config.storage_dtype, normalize=normalize,
                          autocast=None if config.autocast == "none" else config.autocast,
                          optimizer_state=optimizer_state(config), preconditioner=preconditioner,
                          task_weight=task_weight)
    except ValueError as err:
        if not str(err).startswith(f"{optimizer_module.ARGUMENT}:"):
            raise
        raise CLIError(f"--optimizer-state {config.optimizer_state}: {err}") from None


def check_out(args) -> None:
    """--out must lie outside every store (a report or a selection written there could overwrite its files)."""
    if getattr(args, "out", None) is not None:
        refuse_inside_store(args.out, f"--out {args.out}")


def check_rows(attr, docs, store) -> None:
    if attr.n_train != len(docs):
        raise StoreError(f"{store}: docs.jsonl lists {len(docs)} documents but the store holds {attr.n_train} rows")


def require_faiss() -> None:
    """FAISS, or a one-line usage error naming the extra to install."""
    try:
        index_module.require_faiss()
    except ModuleNotFoundError as err:
        raise CLIError(str(err)) from None


def cached_documents(store: Path, corpus: dict, whole: bool = True) -> list[dict]:
    """The cached documents in store row order, checked against the corpus record's SHA-256. whole=False: the
    record's first rows only (a grow that stopped after rewriting docs.jsonl left more after them)."""
    path = store / "docs.jsonl"
    data = path.read_bytes() if path.is_file() else b""
    count = corpus.get("documents")
    if not whole and isinstance(count, int) and count >= 0:
        data = b"".join(data.splitlines(keepends=True)[:count])
    if hashlib.sha256(data).hexdigest() != corpus.get("sha256"):
        raise StoreError(f"{path} is missing or was modified after caching (its rows must match the cached gradients); "
                         "restore it or cache again into a new --store")
    return [doc for _, doc in llm.read_jsonl(path, "cached corpus")][: None if whole else count]


def segments(store: Path, corpus: dict) -> list[int]:
    """The documents each cache of the store added, in row order (one segment unless it grew)."""
    count = corpus.get("documents")
    found = corpus.get("segments", [count])
    if (not isinstance(found, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in found)
            or sum(found) != count):
        raise StoreError(f"{store / CLI_JSON}: corpus segments {found!r} do not add up to its {count!r} documents")
    return found


def load_store(store) -> tuple[Path, CacheConfig, list[dict]]:
    """(store path, cache configuration, documents in store row order), after checking docs.jsonl against the record."""
    store = Path(store)
    if not (store / CLI_JSON).exists():
        raise CLIError(f"{store} is not a grass-attribute store (run `grass-attribute cache --store {store}` first)")
    config, corpus = CacheConfig.read(store)
    docs = cached_documents(store, corpus)
    files = open_store(store)
    unrecorded = sorted({"cli.json", "docs.jsonl"} - set(files.attached()))
    if unrecorded:
        raise StoreError(f"{store}: {unrecorded} are not in the store's record of attached files; run the same "
                         "`grass-attribute cache` again to complete the store")
    files.check_attached()  # the corpus, the configuration and the masks, against their recorded CRC32s
    return store, config, docs
