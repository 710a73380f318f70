"""``grass-attribute cache``: compress a corpus's training gradients into a store (a new store, the rest of an
interrupted one, or the new documents of a larger corpus)."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from grass_ops.atomic_files import write_text_atomic
from grass_ops.benchmarking import peak_rss_bytes, process_seconds, timed_phase

from ... import llm
from ...collectives import collectively, require_agreement
from ...compression import parse_spec
from ...config import AUTOCAST_DTYPES
from ...layers import coverage
from ...optimizer_state import DEFAULT_POWER
from ...store import atomic_write_json, read_json
from ...whitening import KINDS as WHITENED
from ..config import CLI_JSON, COMPILE_MIN_TOKENS, DEFAULT_AUTOCAST, MODEL_CHECKPOINT, CacheConfig
from . import flags as f
from .common import (
    CLIError,
    attributor,
    cached_documents,
    check_checkpoints,
    check_optimizer_state,
    device,
    load_model,
    main_rank,
    optimizer_state,
    resolve_checkpoints,
    segments,
)

DEFAULTS = CacheConfig()


def compile_decision(flag: str, real_tokens: int, autocast: str = "none") -> bool | str:
    """--compile auto|on|off|regional -> the Attributor's ``compile``: True (the whole step), "regional" (the
    repeated blocks) or False. "auto" compiles the whole step when the tokens to compute reach
    COMPILE_MIN_TOKENS[autocast] (the measured break-even of one compile)."""
    if flag not in ("auto", "on", "off", "regional"):
        raise CLIError(f"--compile must be auto, on, off or regional, got {flag!r}")
    if flag == "regional":
        return "regional"
    return flag == "on" or (flag == "auto" and real_tokens >= COMPILE_MIN_TOKENS[autocast])


def _masks(config: CacheConfig, store: Path, model, tokenizer, docs: list[dict], save: bool = True) -> None:
    """Energy masks (attribution.selective_mask.energy_masks) from --mask-documents documents of the
    corpus (a seeded sample), written once into STORE/masks and reused on resume. save=False: computed, not
    written (every rank of a sharded model runs the forwards; rank 0 writes)."""
    name, options = parse_spec(config.compressor)
    if config.masks != "energy" or name != "factgrass" or "mask_dir" in options or config.preconditioner is not None:
        return  # a whitened store chooses its masks in the whitened eigenbasis (attribution.whitening)
    folder = store / "masks"
    record = folder / "masks.json"
    sample = seeded_sample(len(docs), config.mask_documents, config.seed)
    wanted = {"documents": [docs[i]["id"] for i in sample], "k": config.k, "options": options}
    layers = llm.resolve_layers(model, config.layer_patterns)
    scales = _normalized_coordinates(model, config, layers)
    if scales is not None:  # masks chosen in the normalized coordinates: redone for another optimizer state
        wanted["optimizer_state"] = scales[1]
    wanted["autocast"] = config.autocast  # the pass runs under the cache's autocast
    if record.is_file() and _same_masks(read_json(record, "mask record"), wanted):
        return
    batches, _ = llm.document_batches(tokenizer, [docs[i] for i in sample], config.batch_size, config.max_length,
                                      config.token_batch_size)
    from ...selective_mask import energy_masks

    energy_masks(model, llm.sequence_loss, batches, folder, config.k, blowup=float(options.get("blowup", 2.0)),
                 layers=layers, k_in=options.get("k_in"), k_out=options.get("k_out"), progress=True,
                 scales=None if scales is None else scales[0], save=save, autocast=AUTOCAST_DTYPES.get(config.autocast))
    if save:
        atomic_write_json(record, wanted)


def _same_masks(record: dict, wanted: dict) -> bool:
    """Whether a store's mask record is the one ``wanted``. A record without "autocast" was written before the
    mask pass ran under the cache's autocast (in float32, whatever --autocast was): its masks stay, so an older store
    resumes or grows with them. Newer records always name it ("none" too)."""
    if "autocast" not in record:
        wanted = {key: value for key, value in wanted.items() if key != "autocast"}
    return record == wanted


def seeded_sample(n: int, size: int, seed: int) -> list[int]:
    """``size`` of the indices 0..n-1 (all of them if fewer), drawn with ``seed``, in ascending order."""
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].tolist())


def curvature_batches(config: CacheConfig, tokenizer, docs: list[dict]) -> list | None:
    """--curvature-documents: the token batches of a seeded sample of ``docs`` (the first cache's documents, so a
    grown store asks for the same ones) that form a whitened store's curvature; None: the training batches."""
    if config.curvature_documents is None:
        return None
    sample = seeded_sample(len(docs), config.curvature_documents, config.seed)
    return llm.document_batches(tokenizer, [docs[i] for i in sample], config.batch_size, config.max_length,
                                config.token_batch_size)[0]


def _normalized_coordinates(model, config: CacheConfig, layers) -> tuple[dict, dict] | None:
    """({layer: (x_in scale, g_out scale)}, the state's record) of --optimizer-state: FactGraSS scales the factors
    by these before its masks, so the energy masks rank the scaled coordinates (None without a state)."""
    if config.optimizer_state is None:
        return None
    from ... import optimizer_state as optimizer_module
    from ...layers import find_layers

    infos = find_layers(model, layers)
    found = optimizer_module.normalization(model, config.optimizer_state, optimizer_module.DEFAULT_EPS, infos, [],
                                           set(infos), config.power)
    return {n: tuple(scale[1:]) for n, scale in found.scales.items()}, found.record


def _mask_files(attr, store: Path) -> list[str]:
    """The mask files under the store that the compressors loaded, and their record (masks.json)."""
    paths = []

    def walk(spec):
        if isinstance(spec, dict):
            if isinstance(spec.get("path"), str):
                paths.append(Path(spec["path"]))
            for value in spec.values():
                walk(value)

    for compressor in attr.compressors.values():
        walk(compressor.spec())
    root = store.resolve()
    inside = sorted({str(p.resolve().relative_to(root)) for p in paths if p.resolve().is_relative_to(root)})
    record = store / "masks" / "masks.json"
    return inside + (["masks/masks.json"] if inside and record.is_file() else [])


def _write_once(path: Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` unless it holds exactly that; a different content is refused."""
    if path.exists():
        if path.read_text() != text:
            raise CLIError(f"the {what} differs from the one cached in {path.parent}; use the same flags or a new --store")
        return
    write_text_atomic(path, text)


def _flag_value(key: str, value) -> str:
    return "all" if key == "limit" and value is None else json.dumps(value)


def _check_same_flags(store: Path, cached: CacheConfig, config: CacheConfig) -> None:
    """Refuse flags that differ from the store's, naming each flag with its cached and given value."""
    differ = cached.differing(config)
    if differ:
        listed = "; ".join(f"--{key.replace('_', '-')} cached {_flag_value(key, getattr(cached, key))}, given "
                           f"{_flag_value(key, getattr(config, key))}" for key in differ)
        raise CLIError(f"{store} was cached with other flags ({listed}); use the cached values or a new --store")


def _new_documents(store: Path, cached: list[dict], docs: list[dict]) -> list[dict]:
    """The documents of ``docs`` not yet in the store (in corpus order); every cached document must be
    among ``docs`` unchanged, since a store only grows."""
    by_id = {d["id"]: d for d in docs}
    gone = [d["id"] for d in cached if d["id"] not in by_id]
    changed = [d["id"] for d in cached if d["id"] in by_id and by_id[d["id"]] != d]
    if gone or changed:
        what = (f"documents {gone[:3]} of the store are not in the corpus" if gone else
                f"documents {changed[:3]} differ from the cached ones")
        raise CLIError(f"the corpus differs from the one cached in {store}: {what} (a store only grows: give a corpus "
                       "that holds every cached document, or use a new --store)")
    known = {d["id"] for d in cached}
    return [d for d in docs if d["id"] not in known]


def run(args, loaded=None):
    """Cache the corpus into the store: a new store, the rest of an interrupted one, or the new documents
    of a larger corpus (the store grows: its rows keep their order, the new documents are appended).
    ``loaded``: the (model, tokenizer) of the configuration, already loaded."""
    store = Path(args.store)
    fsdp = getattr(args, "fsdp", False)  # `demo` has no --fsdp
    if args.autocast == "auto":  # recorded resolved, so the store reads back the same on any machine
        args.autocast = "bfloat16" if llm.fast_bfloat16(device()) else "none"
    if args.optimizer_state is not None:  # recorded absolute: the later commands read it from any folder
        args.optimizer_state = str(Path(args.optimizer_state).resolve())
    if args.optimizer_power is not None and args.optimizer_state is None:
        raise CLIError(f"--optimizer-power {args.optimizer_power:g} is the power of --optimizer-state's division by "
                       "sqrt(v) + eps: give --optimizer-state FILE with it")
    if args.optimizer_power == DEFAULT_POWER:  # the default, recorded as a store without the flag records it
        args.optimizer_power = None
    if args.adapter is not None:
        args.adapter = str(Path(args.adapter).expanduser().resolve())
        llm.check_adapter_folder(args.adapter)  # before anything is written
        if any(path != MODEL_CHECKPOINT for path in args.checkpoint or []):
            raise CLIError("--checkpoint with --adapter: a checkpoint is a state of the base model, without the adapter's "
                           "weights; only --checkpoint model (the adapted model as loaded) is supported")
    resolve_checkpoints(args)
    config = CacheConfig.from_args(args)
    if config.curvature_documents is not None and config.preconditioner is None:
        raise CLIError("--curvature-documents is the sample of --preconditioner kfac-whitened / ekfac-whitened: give one")
    optimizer_state(config)  # the file read and checked before anything is written
    # under torchrun: every rank the same flags, then the same corpus, before anything is written
    require_agreement({f"--{key.replace('_', '-')}": value for key, value in vars(args).items()
                       if key not in ("func", "config")})
    config.check_corpus_flags()
    saved = store / CLI_JSON
    config_before, corpus_before = CacheConfig.read(store) if saved.exists() else (None, None)
    if config_before is not None:
        _check_same_flags(store, config_before, config)
    phases: dict[str, float] = {}

    def prepare():
        with timed_phase(phases, "load_model"):  # GGUF dequantization included
            model, tokenizer = loaded or load_model(config, fsdp)
        with timed_phase(phases, "tokenize"):
            corpus = llm.load_documents(config, tokenizer)
            cached = cached_documents(store, corpus_before, whole=False) if corpus_before is not None else []
            sizes = segments(store, corpus_before) if corpus_before is not None else []
            added = _new_documents(store, cached, corpus)
            batch_flags = (config.batch_size, config.max_length, config.token_batch_size)
            batches, start = [], 0
            for size in sizes:  # each cache that added documents grouped its own by length: the same batches again
                batches += llm.document_batches(tokenizer, cached[start:start + size], *batch_flags)[0]
                start += size
            pending = batches  # the batches this run may compute (on a resumed store, some of them are done)
            if added:  # store row r is docs[r]: the new documents, grouped by length, follow the cached ones
                new_batches, order = llm.document_batches(tokenizer, added, *batch_flags)
                batches, pending, added = batches + new_batches, new_batches, [added[i] for i in order]
                sizes = sizes + [len(added)]
        return model, tokenizer, cached, added, sizes, batches, pending

    model, tokenizer, cached, added, sizes, batches, pending = collectively(prepare)
    check_optimizer_state(model, config)  # another model's state is refused before the masks are written
    # and checkpoints of another model, or changed ones (every rank reads them: one rank's error stops them all)
    checkpoints = collectively(lambda: check_checkpoints(model, config, store))
    docs = cached + added
    docs_text = "".join(json.dumps(d) + "\n" for d in docs)
    require_agreement({"the corpus": f"{len(docs)} documents, sha256 {hashlib.sha256(docs_text.encode()).hexdigest()}"})
    if config_before is None and (store / "docs.jsonl").exists() and (store / "docs.jsonl").read_text() != docs_text:
        raise CLIError(f"the corpus differs from the one cached in {store}; use a new --store")
    parse_spec(config.compressor)  # validate before anything is written
    mask_docs = cached[:sizes[0]] if cached else docs  # the first cache's documents: a grown store keeps its masks
    with timed_phase(phases, "masks"):
        collectively(lambda: (main_rank() or fsdp) and _masks(config, store, model, tokenizer, mask_docs,
                                                                   save=main_rank()))  # rank 0 writes them
    compile = compile_decision(args.compile, sum(int(b["attention_mask"].sum()) for b in pending), config.autocast)
    with timed_phase(phases, "attributor"):  # the weights' fingerprint included
        attr = collectively(lambda: attributor(model, config, store, compile=compile))  # validates the configuration
    if compile and (added or config_before is None) and main_rank():  # new documents to compute
        what = "the decoder block (once; seconds to a minute" if compile == "regional" else "the cache step (once; minutes"
        print(f"grass-attribute: the first batch compiles {what} on a CPU)", file=sys.stderr)
    grows = config_before is not None and (bool(added) or config_before != config)

    def record():  # rank 0 writes; the others wait for it
        if main_rank():
            corpus_record = {"documents": len(docs), "sha256": hashlib.sha256(docs_text.encode()).hexdigest(),
                             "segments": sizes}
            config_text = config.record_text(corpus_record, checkpoints)
            if grows:  # docs.jsonl first: its first rows stay the cached ones, which the old record still checks
                write_text_atomic(store / "docs.jsonl", docs_text)
                write_text_atomic(saved, config_text)
            else:
                _write_once(store / "docs.jsonl", docs_text, "corpus")
                _write_once(saved, config_text, "configuration")
            attr.store.attach(["docs.jsonl", CLI_JSON, *_mask_files(attr, store)],  # verify checks them
                              replace=("docs.jsonl", CLI_JSON) if grows else ())

    collectively(record)
    curvature = curvature_batches(config, tokenizer, mask_docs)
    start = time.perf_counter()
    attr.cache(batches, curvature_loader=curvature)
    seconds = time.perf_counter() - start
    stats = attr.stats
    phases.update(gradients=stats["gradient_seconds"] - stats["compile_seconds"], compile=stats["compile_seconds"],
                  fim=stats["fim_seconds"], cache_other=seconds - stats["gradient_seconds"] - stats["fim_seconds"])
    if config.preconditioner is not None:  # pass one's wall time (its forwards and backwards are in "gradients" too)
        phases["whitening"] = stats.get("whitening_seconds", 0.0)
    covered = coverage(model, attr.layer_infos)  # of a sharded model: the global shapes
    summary = {"store": str(store), "documents": len(docs), "added_documents": len(added),
               "layers": len(attr.block_names), "k": config.k,
               "parameters_covered": covered["fraction"], "parameters_attributed": covered["attributed"],
               "parameters_total": covered["total"],
               "real_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
               "positions": sum(int(b["attention_mask"].numel()) for b in batches),
               "cache_seconds": seconds, "gradient_seconds": stats["gradient_seconds"],
               "fim_seconds": stats["fim_seconds"], "compile": args.compile, "compiled": stats["compiled"],
               "compile_seconds": stats["compile_seconds"], "graph_breaks": stats["graph_breaks"],
               "compile_fallback": stats.get("fallback"), "seconds": phases, "process_seconds": process_seconds(),
               "peak_rss_mb": peak_rss_bytes() / 2**20}
    if config.preconditioner is not None:  # how much of the whitened second moment the store keeps: every checkpoint's layers
        shares = [share for layers in stats["whitening_kept_share"].values() for share in layers.values()]
        summary["whitening_kept_share"] = {"mean": sum(shares) / len(shares), "min": min(shares)}
    if main_rank():
        print(json.dumps(summary))
    return summary


# The cache configuration's flags (CacheConfig's fields, its defaults), in --help's order.
CONFIG_FLAGS = [
    f.Flag("--model", "'smollm2' (embedded), a folder or a hub id", default=DEFAULTS.model),
    f.Flag("--gguf-file", "the GGUF file inside --model's folder or hub repo (default: none, safetensors weights)"),
    f.Flag("--adapter", "a LoRA / PEFT adapter folder (PeftModel.save_pretrained) applied to --model: the default layers "
                        "become the adapter's trainable lora_A / lora_B (--layers can name the base layers: "
                        "base_model.model.<name>.base_layer); recorded absolute (default: none)", metavar="DIR"),
    f.Flag("--corpus", "'python-docs' (embedded), a .jsonl or a .txt (default: python-docs)"),
    f.Flag("--dataset", "a Hugging Face datasets dataset: a save_to_disk folder, or a .parquet / .arrow / .jsonl / .csv "
                        "file (the `llm` extra; default: none)"),
    f.Flag("--split", "the --dataset split (default: train, or its only split)"),
    f.Flag("--text-field", "the field holding each document's text (.jsonl, --dataset)", default=DEFAULTS.text_field),
    f.Flag("--prompt-field", "--dataset rows as prompt/completion pairs (only the completion is a target), with "
                             "--completion-field (default: none)"),
    f.Flag("--completion-field", "the completion field of --prompt-field rows (default: none)"),
    f.Flag("--messages-field", "--dataset rows as chat messages, rendered with the tokenizer's chat template (default: none)"),
    f.Flag("--limit", "documents to take from the corpus (a positive int, or 'all'); a larger limit on an existing store "
                      "grows it", default=DEFAULTS.limit, type=f.limit),
    f.Flag("--layers", "module name patterns, each must match (default: every linear layer of the transformer blocks: "
                       "model.layers.* or transformer.h.*)", nargs="+"),
    f.Flag("--compressor", "compressor spec (attribution.compression), e.g. factgrass:blowup=4, logra, sjlt",
           default=DEFAULTS.compressor),
    f.Flag("--masks", "FactGraSS masks: 'energy' keeps each layer's highest second-moment coordinates, measured on "
                      "--mask-documents documents of the corpus; 'random' draws them from the seed",
           default=DEFAULTS.masks, choices=["energy", "random"]),
    f.Flag("--mask-documents", "documents (a seeded sample of the corpus) that --masks energy measures",
           default=DEFAULTS.mask_documents, type=f.positive_int),
    f.Flag("--k", "compressed dimension per layer", default=DEFAULTS.k, type=f.positive_int),
    f.Flag("--max-length", "tokens per document (longer ones are cut)", default=DEFAULTS.max_length, type=f.max_length),
    f.Flag("--batch-size", "documents per batch (at most)", default=DEFAULTS.batch_size, type=f.positive_int),
    f.Flag("--token-batch-size", "padded tokens per batch (at most; default: no limit); documents are grouped by length, "
                                 "so no compute is spent on padding beyond each batch's longest document", type=f.positive_int),
    f.Flag("--storage-dtype", "dtype of the stored gradients (bfloat16 halves the store)", default=DEFAULTS.storage_dtype,
           choices=["float32", "bfloat16", "float16"]),
    f.Flag("--dtype", "dtype of the model's weights", default=DEFAULTS.dtype, choices=sorted(llm.DTYPES)),
    f.Flag("--autocast", "matmuls of the gradient passes under torch.autocast (float32 weights, factors compressed in "
                         "float32); auto: bfloat16 where the hardware runs it natively, else none (recorded resolved)",
           default=DEFAULT_AUTOCAST, choices=["none", "bfloat16", "float16", "auto"]),
    f.Flag("--damping", "added to the FIM's eigenvalues before inverting it (larger: closer to a plain dot product): "
           "'<factor>*mean' is factor times each layer block's mean eigenvalue, so the same whatever the gradients' "
           "scale (the optimizer-normalized ones are 1e3-1e5 times larger); a number is absolute",
           default=DEFAULTS.damping, type=f.damping),
    f.Flag("--seed", "seed of the random projections and masks", default=DEFAULTS.seed, type=int),
    f.Flag("--optimizer-state", "an Adam/AdamW optimizer state (torch.save of optimizer.state_dict(), e.g. a Hugging "
                                "Face Trainer checkpoint's optimizer.pt): every gradient is divided by sqrt(v) + 1e-8, "
                                "v its second moment (FactGraSS: v's Adafactor row and column factors); the later "
                                "commands read it again from the recorded absolute path (default: none)",
           metavar="FILE"),
    f.Flag("--optimizer-power", "with --optimizer-state: divide every gradient by (sqrt(v) + eps) ** P instead; 0.5 "
                                "makes --method graddot score the first-order effect of one Adam step on each document "
                                "(what tail-patch measures: influence, not retrieval; BENCHMARKS.md) (default: 1, "
                                "TrackStar's)", type=f.positive_float, metavar="P"),
    f.Flag("--checkpoint", "a model state whose gradients are cached, instead of the --model's (repeatable; TracIn-CP: "
                           "the score is the weighted sum over the checkpoints): a Hugging Face model folder of the "
                           "--model's architecture, a .safetensors file or a torch.save of a state dict, or `model` for "
                           "the --model's own weights; recorded absolute with its fingerprint, and read one at a time "
                           "(default: the --model's weights alone)", action="append", metavar="DIR|FILE|model"),
    f.Flag("--preconditioner", "whiten both sides before compressing (the store holds C(P^-1/2 g), P each layer's K-FAC or "
                               "EK-FAC curvature, damped by --damping; `attribute --method if` then needs no further "
                               "curvature): kfac-whitened or ekfac-whitened; a first pass over the corpus (or "
                               "--curvature-documents) computes P (default: none, the store keeps the raw compressed "
                               "gradients and their FIM)", choices=list(WHITENED)),
    f.Flag("--curvature-documents", "--preconditioner: the documents (a seeded sample of the corpus) whose factors form P "
                                    "(default: every document of the first cache; a grown store keeps its P)",
           type=f.positive_int),
    f.Flag("--checkpoint-weight", "the weight of each --checkpoint in the score, one per checkpoint in their order "
                                  "(repeatable; e.g. the learning rate at that checkpoint; default: 1.0 each)",
           type=f.finite_float, action="append", metavar="W"),
]

COMMAND = f.Command("cache", "compress a corpus's training gradients into a store (a larger --limit or corpus grows it)",
                    [f.STORE, *CONFIG_FLAGS, *f.COMPILE, f.FSDP], run)
