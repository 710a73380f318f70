"""What the commands share: the usage error, the process's rank and device, the Attributor of a cache
configuration, and a cached store read back (its configuration and documents, checked)."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from grass_ops.benchmarking import release_freed_memory

from ... import index as index_module
from ... import llm, process_group, sharding
from ... import optimizer_state as optimizer_module
from ...attributor import Attributor
from ...checkpoints import check_state
from ...compression import parse_spec
from ...layers import find_layers
from ...store import StoreError, open_store, refuse_inside_store
from ...store.manifest import model_fingerprint
from ..config import CLI_JSON, MODEL_CHECKPOINT, CacheConfig, recorded_checkpoints


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


def load_model(config: CacheConfig, fsdp: bool = False):
    """(model, tokenizer) of the configuration, on this rank's device (with its --adapter applied); ``fsdp``:
    sharded across the torchrun ranks with FSDP2 (attribution.sharding.shard)."""
    if fsdp and process_group.rank_and_world()[1] < 2:
        raise CLIError("--fsdp shards the model across the ranks of torchrun: run it under torchrun with 2 or more ranks")
    # sharded: loaded on the CPU, each rank's shards moved to its device by fully_shard (not the whole model)
    model, tokenizer = llm.load_model(config.model, config.gguf_file, config.dtype, device="cpu" if fsdp else device())
    model = model if config.adapter is None else llm.apply_adapter(model, config.adapter)
    if fsdp:
        try:
            model = sharding.shard(model, device())
            release_freed_memory()  # the whole model's loaded copy goes back to the system
        except ValueError as err:
            raise CLIError(f"--fsdp: {err}") from None
    return model, tokenizer


def compressor_spec(config: CacheConfig, store: Path) -> str:
    """The compressor spec, with the store's data-aware masks for FactGraSS (--masks energy)."""
    name, options = parse_spec(config.compressor)
    if config.masks == "energy" and name == "factgrass" and "mask_dir" not in options and config.preconditioner is None:
        return f"{config.compressor}{',' if ':' in config.compressor else ':'}mask_dir={store / 'masks'}"
    return config.compressor


@functools.lru_cache(maxsize=1)
def _loaded_state(path: str, stamp: tuple):
    return optimizer_module.load(path)


def release_optimizer_states() -> None:
    """Drop the read --optimizer-state kept for the next command of the process (its memory-mapped second moments,
    resident once read: 0.4 GB on the main job), e.g. before the demo's tail-patch maps the file again."""
    _loaded_state.cache_clear()


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


def resolve_checkpoints(args) -> None:
    """--checkpoint paths made absolute (the later commands read them from any folder; ``model`` stays) and
    --checkpoint-weight defaulted to 1.0 each; a usage error for a weight count that does not match."""
    paths, weights = args.checkpoint, args.checkpoint_weight
    if paths is None:
        if weights is not None:
            raise CLIError("--checkpoint-weight weighs a --checkpoint: give the checkpoints too")
        return
    if weights is not None and len(weights) != len(paths):
        raise CLIError(f"--checkpoint-weight: expected one per --checkpoint ({len(paths)}), got {len(weights)}")
    args.checkpoint = [p if p == MODEL_CHECKPOINT else str(Path(p).resolve()) for p in paths]
    args.checkpoint_weight = [1.0] * len(paths) if weights is None else weights


def _file_versions(path: str) -> tuple:
    """(name, size, mtime) of the file, or of every file under the folder: changes when a checkpoint is rewritten."""
    where = Path(path)
    files = sorted(p for p in where.rglob("*") if p.is_file()) if where.is_dir() else [where]
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists())


_fingerprints: dict[tuple, str] = {}  # (path, file versions, dtype, the model's names and shapes) -> fingerprint


def checkpoint_fingerprint(model, config: CacheConfig, index: int) -> str:
    """The sha256 fingerprint of --checkpoint number ``index`` (of its tensors as loaded, model_fingerprint), after
    checking that it fits the model (attribution.checkpoints.check_state); each file version is read once per
    process. A missing or unreadable checkpoint, or one of another model, is a usage error naming it."""
    path = config.checkpoint[index]
    if path == MODEL_CHECKPOINT:
        return model_fingerprint(model.state_dict(), "sha256")
    if not Path(path).exists():
        raise CLIError(f"--checkpoint {path}: no such folder or file")
    key = (path, _file_versions(path), config.dtype, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    if key not in _fingerprints:
        try:
            state = check_state(model, llm.load_state(path, config.dtype), index)
        except (ValueError, TypeError, OSError) as err:
            raise CLIError(f"--checkpoint {path}: {err}") from None
        _fingerprints[key] = model_fingerprint(state, "sha256")
    return _fingerprints[key]


def check_checkpoints(model, config: CacheConfig, store) -> list[dict] | None:
    """The checkpoints' record ([{"path", "fingerprint"}] in --checkpoint order; None without --checkpoint), each
    checkpoint checked to fit the model and, when the store's cli.json records them, to be unchanged since."""
    if config.checkpoint is None:
        return None
    recorded = recorded_checkpoints(store) or []
    records = [{"path": path, "fingerprint": checkpoint_fingerprint(model, config, i)}
               for i, path in enumerate(config.checkpoint)]
    for then, now in zip(recorded, records):
        if then != now:
            raise CLIError(f"--checkpoint {now['path']} differs from the one {store} was cached with (fingerprint "
                           f"{then.get('fingerprint')} then, {now['fingerprint']} now): restore it, or cache into a "
                           "new --store")
    return records


def checkpoint_states(config: CacheConfig) -> list | None:
    """The Attributor's checkpoints of --checkpoint (None without): None for ``model`` (the --model's own
    weights), else a loader that reads the folder or file each time the checkpoint is needed (llm.load_state).

    Memory: one checkpoint at a time besides the model's own weights (swapped in by reference,
    attribution.checkpoints.WeightSwap: about 2x the weights at peak; a torch.save file is memory-mapped).
    Time: each checkpoint is read again whenever it is needed: fingerprinted by the Attributor, swapped in for the
    cache or the queries (with the once-per-process check_checkpoints read, 4 reads per cache and 5 per attribute
    run)."""
    if config.checkpoint is None:
        return None
    return [None if path == MODEL_CHECKPOINT else functools.partial(llm.load_state, path, config.dtype)
            for path in config.checkpoint]


def check_whitened_scoring(whitened: str, method: str, given: str | None) -> None:
    """A whitened store (cache --preconditioner ``whitened``) serves --method if with its own preconditioner only."""
    if method != "if" or given not in (None, whitened):
        shown = f"--method {method}" + (f" --preconditioner {given}" if given else "")
        raise CLIError(f"the store holds whitened gradients (cached with --preconditioner {whitened}): they serve --method "
                       f"if with that preconditioner only (--normalize for their cosine), not {shown}")


def attributor(model, config: CacheConfig, store, method="if", compile=False, normalize=False, preconditioner=None,
               task_weight=None):
    """The Attributor of a cache configuration over ``store`` (at its --checkpoint states, checked against the
    store's record first; ``preconditioner`` / ``task_weight``: the Attributor's, e.g. "mixed" and its weight: the
    store's FIM serves both); an error of its --optimizer-state (another model's state, or a store cached with
    another one) is a usage error naming the flag."""
    check_checkpoints(model, config, store)
    if config.preconditioner is not None:  # a whitened store: its rows serve one scoring
        check_whitened_scoring(config.preconditioner, method, preconditioner)
        preconditioner = config.preconditioner
    weights = None if config.checkpoint_weight is None else list(config.checkpoint_weight)
    try:
        return Attributor(model, llm.sequence_loss, method=method, compressor=compressor_spec(config, Path(store)),
                          k=config.k, damping=config.damping, store=store,
                          layers=llm.resolve_layers(model, config.layer_patterns), seed=config.seed, compile=compile,
                          storage_dtype=config.storage_dtype, normalize=normalize,
                          autocast=None if config.autocast == "none" else config.autocast,
                          optimizer_state=optimizer_state(config),
                          optimizer_power=config.power,
                          preconditioner=preconditioner,
                          task_weight=task_weight, checkpoints=checkpoint_states(config), checkpoint_weights=weights,
                          whitening_masks=config.masks if config.preconditioner is not None else "energy")
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
