"""The main job: fact tracing with the embedded SmolLM2, end to end, measured.

1. Twenty invented facts are planted in the Python-docs corpus (attribution.evaluation.facts), and the model is
   briefly fine-tuned on that corpus (seeded, CPU; the weights are kept in ``out/model`` and reused).
2. The corpus is cached with the CLI's default configuration (the real pipeline: store, resume,
   checksums) at two checkpoints, the untuned and the fine-tuned model (TracIn-CP), and each fact is asked
   with a paraphrased question; the planted fact's true answer (``--answer true``, the default: fact tracing) or
   the model's own answer (``--answer own``) is the completion whose training documents we look for, scored
   with a curvature that mixes the questions' FIM into the training one (TrackStar).
3. The default method's top documents per question are reported (report.md / .html / .json), with
   recall@1, recall@5 and MRR of each fact's source document, beside the other compressors and
   scorings, a lexical BM25 baseline, the untuned model and both checkpoints together, and a plot of recall per
   method.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from grass_ops.atomic_files import atomic_writer, write_json_atomic
from grass_ops.benchmarking import fix_mmap_threshold, limit_primitive_cache, peak_rss_bytes, release_freed_memory

from .. import llm
from ..evaluation import facts
from ..evaluation.fidelity import Method, measure, scores
from ..evaluation.metrics import mean_and_standard_error
from ..layers import find_layers
from .commands import cache
from .commands.attribute import attribute_queries
from .commands.common import CLIError, check_out, load_store, release_optimizer_states
from .config import ANSWERS, DEFAULT_ANSWER
from .report import write_reports


def finetune_autocast():
    """The fine-tuning's matmul precision (bfloat16 where this CPU has fast bfloat16, else None: float32); the
    tail-patch steps take the same."""
    return torch.bfloat16 if llm.fast_bfloat16() else None


PRECISIONS = {"bfloat16": torch.bfloat16, "none": None}  # facts.json's "finetune_autocast" -> the autocast dtype


def precision_name(autocast) -> str:
    """``autocast`` (a dtype or None) as facts.json records it: a key of :data:`PRECISIONS`."""
    return next(name for name, dtype in PRECISIONS.items() if dtype == autocast)


def recorded_autocast(meta: dict):
    """The autocast that a facts.json's run fine-tuned and tail-patched under (its meta's "finetune_autocast"), or,
    for a facts.json written before it was recorded, this CPU's (:func:`finetune_autocast`)."""
    if "finetune_autocast" not in meta:
        return finetune_autocast()
    if meta["finetune_autocast"] not in PRECISIONS:
        raise ValueError(f"facts.json's finetune_autocast must be one of {sorted(PRECISIONS)}, got "
                         f"{meta['finetune_autocast']!r}")
    return PRECISIONS[meta["finetune_autocast"]]


OPTIMIZER_FILE = "optimizer.pt"  # the fine-tuning's AdamW state_dict(), beside the model folder


def finetuned_model(out: Path, epochs: int, seed: int, corpus: list[dict], progress: bool = True):
    """(model, tokenizer, info): the embedded SmolLM2 fine-tuned on ``corpus``, trained once and saved under
    ``out`` with the optimizer's state (``optimizer.pt``: AdamW's moments where the training ended, for
    TrackStar's normalization and for tail-patch; read back by ``load_optimizer`` when needed, so that its
    1 GB is not held through the cache and the comparison), reused when its recorded configuration matches."""
    autocast = finetune_autocast()
    config = {"base": llm.DEFAULT_MODEL, "epochs": epochs, "seed": seed, "lr": FINETUNE_LR, "corpus_per_epoch": 12,
              "autocast": str(autocast), "documents": [d["id"] for d in corpus], "optimizer_state": OPTIMIZER_FILE}
    folder, record, state = out / "model", out / "model.json", out / OPTIMIZER_FILE
    if (record.is_file() and json.loads(record.read_text()).get("config") == config and (folder / "config.json").is_file()
            and state.is_file()):
        model, tokenizer = llm.load_model(str(folder))
        return model, tokenizer, json.loads(record.read_text())["info"]
    torch.manual_seed(seed)
    model, tokenizer = llm.load_model(llm.DEFAULT_MODEL)
    base_model_folder(out, (model, tokenizer))  # the untuned weights, saved before they change (no second GGUF load)
    release_freed_memory()  # the GGUF load's dequantized copies and the save's buffers, before the moments come
    optimizer = facts.finetune_optimizer(model, config["lr"])
    info = facts.finetune(model, tokenizer, corpus, epochs=epochs, lr=config["lr"], seed=seed,
                          corpus_per_epoch=config["corpus_per_epoch"], progress=progress, autocast=autocast,
                          optimizer=optimizer)
    with atomic_writer(state) as handle:
        torch.save(optimizer.state_dict(), handle)
    del optimizer  # its moments (1 GB) are freed before the weights are serialized
    release_freed_memory()
    save_folder(model, tokenizer, folder)
    write_json_atomic(record, {"config": config, "info": info}, indent=1)  # last: it marks the folder complete
    return model, tokenizer, info


FINETUNE_LR = 2e-4


def base_model_folder(out: Path, loaded=None) -> Path:
    """The untuned embedded model as a Hugging Face folder ``out/base_model`` (the comparison's untuned control and
    the checkpoint that ``--checkpoints base|both`` caches; it loads in 0.5 s where the GGUF takes 17 s), written
    once: into a temporary folder, renamed when complete; ``source.json`` names the model it holds, and a folder of
    another one is replaced. ``loaded``: (model, tokenizer) of the untuned embedded model when the caller has it."""
    folder, source = out / "base_model", {"base": llm.DEFAULT_MODEL}
    record = folder / "source.json"
    if not (record.is_file() and json.loads(record.read_text()) == source and (folder / "model.safetensors").is_file()):
        tmp = out / "base_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model, tokenizer = loaded if loaded is not None else llm.load_model(llm.DEFAULT_MODEL)
        save_folder(model, tokenizer, tmp)
        del model
        write_json_atomic(tmp / "source.json", source)  # which model it holds: another one is saved anew
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


CHECKPOINTS = {"tuned": ("model",), "base": ("base",), "both": ("base", "model")}  # --checkpoints: whose gradients
CHECKPOINT_LABELS = {"base": "the untuned model's gradients", "both": "tuned + untuned checkpoints (TracIn-CP)"}


def check_store_checkpoints(store: Path, choice: str) -> None:
    """A usage error, before anything is loaded, where ``store`` was cached by the demo for another --checkpoints
    choice (the default changed from tuned to both: an older store names the flags that reuse it)."""
    record = store / "cli.json"
    if not record.is_file():
        return
    cached = json.loads(record.read_text()).get("flags", {}).get("checkpoint")
    names = ("model",) if cached is None else tuple("model" if c == "model" else "base" if Path(c).name == "base_model"
                                                    else c for c in cached)
    cached_choice = next((name for name, checkpoints in CHECKPOINTS.items() if checkpoints == names), None)
    if cached_choice is not None and cached_choice != choice:
        raise CLIError(f"--store {store} was cached with --checkpoints {cached_choice} (the default is now both): give "
                       f"--checkpoints {cached_choice}" + (" --task-weight 0 for the old default's scoring" if
                                                            cached_choice == "tuned" else "") + ", or another --store")


def load_optimizer(out: Path, model, first_moment: bool = True):
    """The fine-tuning's AdamW with its state as saved under ``out`` (``optimizer.pt``), on ``model``'s parameters;
    ``first_moment=False`` drops Adam's ``exp_avg`` (a copy of the parameters' size), which a tail-patch step
    without momentum (the demo's) does not read."""
    optimizer = facts.finetune_optimizer(model, FINETUNE_LR)
    # memory-mapped: a moment the step does not read is never read from the file
    optimizer.load_state_dict(torch.load(out / OPTIMIZER_FILE, weights_only=True, mmap=True))
    for state in optimizer.state.values() if not first_moment else ():
        del state["exp_avg"]
    return optimizer


def save_folder(model, tokenizer, folder: Path) -> None:
    """A Hugging Face folder (config, tokenizer, model.safetensors) that llm.load_model reads back;
    a GGUF-loaded model cannot save_pretrained, so its weights are written with safetensors."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)  # the weights are plain float tensors now
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))


def answer_queries(model, tokenizer, max_new_tokens: int = 16, answer: str = DEFAULT_ANSWER) -> list[dict]:
    """Each fact's paraphrased question, completed by the model (its first line: "model_answer", and "correct"
    whether it states the fact). The attributed "completion" is, by ``answer`` (one of :data:`ANSWERS`), the planted
    fact's true answer ("true", facts.true_answer) or the model's own answer ("own"; the fact's answer when the
    model's is empty: facts.model_answer)."""
    if answer not in ANSWERS:
        raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
    prompts = [facts.question_prompt(f) for f in facts.FACTS]
    answers = [a.split("\n")[0] for a in llm.complete(model, tokenizer, prompts, max_new_tokens)]
    queries = []
    for fact, prompt, said in zip(facts.FACTS, prompts, answers):
        query = {"id": fact.id, "prompt": prompt, "model_answer": said, "target": fact.id,
                 "correct": facts.answered(fact, said)}
        chosen = facts.true_answer(query) if answer == "true" else facts.model_answer(query)
        queries.append({**query, "completion": chosen["completion"]})
    return queries


SCORINGS = {"if": "raw IF", "if-unit": "IF on unit-normalized gradients", "cosine": "cosine (no FIM)", "bm25": "BM25"}
COMPARED = {  # name -> (compressor spec, scoring); the default is added by the caller
    "FactGraSS, random masks (blow-up 2), raw IF": ("factgrass:blowup=2", "if"),
    "FactGraSS, random masks (blow-up 2), cosine": ("factgrass:blowup=2", "cosine"),
    "LoGra, cosine": ("logra", "cosine"),
    "LoGra, IF on unit-normalized gradients": ("logra", "if-unit"),
    "SJLT on the flat gradient, cosine": ("sjlt", "cosine"),
    "SJLT on the flat gradient, raw IF": ("sjlt", "if"),
}


def compare(model, tokenizer, base_model, docs: list[dict], queries: list[dict], k: int, max_length: int,
            token_batch_size: int, default: tuple[str, str]) -> list[dict]:
    """Retrieval metrics of every compared method (one pass over the corpus for all of them), BM25,
    and, as a control, the default compressor spec (random masks) on the untuned base model's gradients, alone and
    summed with the tuned model's (TracIn-CP over both checkpoints) (``base_model``: the model, or a function that
    loads it, called once the tuned model's features are freed)."""
    layers = find_layers(model, llm.DEFAULT_LAYERS[:1])
    doc_batches, order = llm.document_batches(tokenizer, docs, None, max_length, token_batch_size)
    ordered = [docs[i] for i in order]
    query_batches = llm.query_batches(tokenizer, queries, None, max_length, token_batch_size)
    targets = [q["target"] for q in queries]
    ids = [d["id"] for d in ordered]
    methods = {"default": Method(default[0], k, default[1]),
               **{name: Method(spec, k, scoring) for name, (spec, scoring) in COMPARED.items()}}
    start = time.perf_counter()
    _, features = measure(model, llm.sequence_loss, layers, doc_batches, query_batches,
                          {name: m for name, m in methods.items()}, truth=False)
    rows = []
    tuned = scores(features["default"], methods["default"])  # [n_query, n_doc], kept for the two-checkpoint row
    for name, method in methods.items():
        spec = str(method.compressor)
        if name == "default":  # "tuned": the reference of the untuned and two-checkpoint rows (same masks and damping)
            rows.append(evaluated(f"{spec}, random masks (not the store's energy masks), {SCORINGS[method.scoring]}",
                                  tuned, ids, targets, compressor=spec, scoring=method.scoring, row="tuned"))
        else:
            rows.append(evaluated(name, scores(features[name], method), ids, targets, compressor=spec,
                                  scoring=method.scoring))
    rows.append(evaluated("BM25 (question + answer vs document text)", bm25(queries, ordered), ids, targets,
                          compressor=None, scoring="bm25"))
    del features
    release_freed_memory()
    if callable(base_model):  # loaded only now: the tuned model's features are freed first
        base_model = base_model()
    base_layers = find_layers(base_model, llm.DEFAULT_LAYERS[:1])
    _, base = measure(base_model, llm.sequence_loss, base_layers, doc_batches, query_batches,
                      {"default": methods["default"]}, truth=False)
    untuned = scores(base["default"], methods["default"])
    rows.append(evaluated(f"control: the untuned base model, {default[0]}, random masks, {SCORINGS[default[1]]}",
                          untuned, ids, targets, compressor=str(default[0]), scoring=default[1], row="base"))
    # TracIn-CP over the two checkpoints with equal weights (as `cache --checkpoint base --checkpoint model` sums them);
    # with this relative damping each checkpoint's IF is invariant to its gradients' scale, so the sum weighs both
    # alike (the store's absolute --damping does not make it exactly so)
    rows.append(evaluated(f"both checkpoints (tuned + untuned, TracIn-CP, equal weights), {default[0]}, random masks, "
                          f"{SCORINGS[default[1]]}", tuned + untuned, ids, targets, compressor=str(default[0]),
                          scoring=default[1], row="both"))
    for row in rows:
        row["seconds"] = time.perf_counter() - start
    return rows


def bm25(queries: list[dict], docs: list[dict]):
    """BM25 scores [n_query, n_doc] of each question and its answer against the documents' text."""
    return facts.bm25_scores([q["prompt"] + " " + q["completion"] for q in queries], [d["text"] for d in docs])


def evaluated(label: str, score_matrix, ids: list[str], targets: list[str], **fields) -> dict:
    """An evaluation row: ``label``, ``fields``, the retrieval metrics of ``score_matrix`` [n_query, n_doc] (columns
    in ``ids``' order) and "ranking": each query's top max(TAIL_PATCH_KS) document ids (ties to the lower column),
    the documents tail-patch steps on."""
    order = torch.argsort(-score_matrix, dim=1, stable=True)[:, : max(facts.TAIL_PATCH_KS)]
    return {"method": label, **fields, **facts.retrieval_metrics(score_matrix, ids, targets),
            "ranking": [[ids[j] for j in row] for row in order.tolist()]}


def two_stage(score_matrix, lexical, candidates: int):
    """Two-stage retrieval from score matrices [n_query, n_doc]: each query's top ``candidates`` BM25 documents
    re-ranked by ``score_matrix``, the others after them (what ``attribute --candidates bm25`` returns, where
    documents outside the candidates are not ranked at all)."""
    top = torch.argsort(-lexical, dim=1, stable=True)[:, :candidates]
    out = torch.full_like(score_matrix, -torch.inf)
    return out.scatter(1, top, score_matrix.gather(1, top))


COMPARE_TOKEN_BATCH = 512  # tokens per batch of the comparison pass (compressed inside the backward, as the cache)
TWO_STAGE_CANDIDATES = 10  # BM25 candidates per question that the two-stage row re-ranks
# `--tail-patch main`: the rows that get tail-patch (the store's other row, an ablation of the default's curvature or
# normalization, with `--tail-patch all`: its ten documents' backward passes a question are a fifth of them or more)
TAIL_PATCH_ROWS = ("default", "bm25", "two-stage", "influence")
# the influence row: GradDot on gradients divided by (sqrt(v) + eps) ** INFLUENCE_POWER on each side, so that a score is
# the first-order effect of one AdamW step on the document, which is what tail-patch measures (BENCHMARKS.md, "The
# step's first order")
INFLUENCE_POWER = 0.5


def influence_store(store) -> Path:
    """The influence row's store, beside the default's: ``<store>-influence``."""
    store = Path(store).resolve()  # "." or "a/.." name no folder of their own
    return store.with_name(store.name + "-influence")


def influence_row(args, model, tokenizer, queries: list[dict], ids: list[str], targets: list[str]) -> tuple[dict, dict]:
    """(the influence row, its cache summary): the fine-tuned model's gradients (no other checkpoint) cached with the
    default's compressor, k and masks into :func:`influence_store`, each divided by (sqrt(v) + eps) **
    :data:`INFLUENCE_POWER` (v: the fine-tuning's AdamW second moment, ``<out>/optimizer.pt``), and ranked by GradDot
    over each document's count of target tokens: <g_q, g_d / (sqrt(v) + eps)> with g_d the gradient of d's mean token
    loss, which is, up to the learning rate and to first order, the change of the answer's log-probability after one
    step on document d without momentum, as tail-patch takes it (a step on k documents follows their token-weighted
    mean). ``args``: the demo's, as :func:`run` has completed them."""
    flags = argparse.Namespace(**vars(args))
    flags.store, flags.checkpoint, flags.checkpoint_weight = str(influence_store(args.store)), None, None
    flags.optimizer_state, flags.optimizer_power = str(Path(args.out) / OPTIMIZER_FILE), INFLUENCE_POWER
    summary = cache.run(flags, (model, tokenizer))
    store, config, docs = load_store(flags.store)
    if [d["id"] for d in docs] != list(ids):
        raise RuntimeError(f"{flags.store} holds other documents than {args.store}: remove it and run the demo again")
    _, scores = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k, method="graddot",
                                  normalize=False)
    # the store holds each document's summed token loss's gradient; the step on one document follows its mean
    tokens = torch.tensor([facts.target_tokens(tokenizer, [d], config.max_length) for d in docs], dtype=scores.dtype)
    scores = scores / tokens
    release_optimizer_states()  # its second moments, mapped and read, are not held through tail-patch (run d18: +0.43 GiB)
    label = (f"influence: GradDot on the tuned model's gradients divided by (sqrt(v) + eps) ** {INFLUENCE_POWER:g} "
             f"(the training step's first order), {config.compressor}, {config.masks} masks, k={config.k}")
    return evaluated(label, scores, ids, targets, row="influence"), summary


def tail_patched(row: dict, choice: str) -> bool:
    """Whether ``demo --tail-patch choice`` ("main", "all" or "none") steps on ``row``'s ranking."""
    return choice == "all" or choice == "main" and row.get("row") in TAIL_PATCH_ROWS


def tail_patch_rows(model, optimizer, tokenizer, corpus: list[dict], queries: list[dict], rows: list[dict], *,
                    seed: int, max_length: int, autocast=None, progress: bool = True) -> list[dict]:
    """TrackStar's tail-patch for each row with a "ranking" (top documents per query), and its two reference
    rows: k documents drawn at random (seeded by ``seed`` and the question's index) and the true source alone
    (k = 1). Each row gains, for k in facts.TAIL_PATCH_KS (means over the questions, nats, with their standard
    errors in ``_se``):

    - tail_patch@k: on the model's own answer (facts.model_answer: the answer attributed unless ``demo --answer
      true``);
    - tail_patch@k_answered: the same over the questions answered right, where there are two or more;
    - tail_patch@k_true: on the planted fact's true answer (facts.true_answer: TrackStar's definition), every
      question, measured after the same steps;

    and the per-question values (tail_patch_per_query and tail_patch_true_per_query: {str(k): [nats per
    question]}); returns the two reference rows.
    One step from the fine-tuned ``model`` with ``optimizer``'s class, state and learning rate."""
    from tqdm import tqdm

    random_row = {"method": f"reference: k documents at random (seeded, seed {seed})", "scoring": "random"}
    source_row = {"method": "reference: the true source paragraph alone (k = 1)", "scoring": "source"}
    patched = [r for r in rows if r.get("ranking")]
    per_row = {id(r): [] for r in [*patched, random_row, source_row]}  # per question: {k: [own answer, true answer]}
    ids = [str(d["id"]) for d in corpus]
    for i, query in enumerate(tqdm(queries, disable=not progress, leave=False, desc="tail-patch")):
        # every ranking of the question in one call: a set of documents that two rankings share is stepped on once,
        # and each step is evaluated on the model's answer and the true one in one forward
        rankings = {f"row {j}": row["ranking"][i] for j, row in enumerate(patched)}
        rankings.update(facts.reference_rankings(ids, query["target"], seed, i))
        ks = {name: (1,) if name == "source" else facts.TAIL_PATCH_KS for name in rankings}
        patches = facts.tail_patch_rankings(model, optimizer, corpus, facts.tail_patch_answers(query), rankings,
                                            tokenizer=tokenizer, ks=ks, max_length=max_length, autocast=autocast)
        for j, row in enumerate(patched):
            per_row[id(row)].append(patches[f"row {j}"])
        per_row[id(random_row)].append(patches["random"])
        per_row[id(source_row)].append(patches["source"])
        release_freed_memory()  # each question's gradients and stepped copies, freed, leave the resident set
    for row in [*patched, random_row, source_row]:
        summarize_tail_patches(row, per_row[id(row)], queries)
    return [random_row, source_row]


def summarize_tail_patches(row: dict, patches: list[dict[int, list[float]]], queries: list[dict]) -> None:
    """``row`` gains the tail-patch keys of :func:`tail_patch_rows` from ``patches``: per question (in ``queries``'
    order), {k: [on the model's answer, on the true answer]} (facts.tail_patch_rankings of
    facts.tail_patch_answers(query))."""
    own = [{k: values[0] for k, values in by_k.items()} for by_k in patches]
    true = [{k: values[1] for k, values in by_k.items()} for by_k in patches]
    summaries = {"": facts.tail_patch_summary(own), "_true": facts.tail_patch_summary(true)}
    # over the questions the model answers right: where the answer is the planted fact, so the documents that
    # state it should raise it (a wrong answer's true source can push it down by nats and sway the mean)
    answered = [i for i, q in enumerate(queries) if q.get("correct")]
    if len(answered) > 1:  # a mean with a standard error: two questions at least
        summaries["_answered"] = facts.tail_patch_summary([own[i] for i in answered])
    for suffix, by_k in summaries.items():
        for k, summary in by_k.items():
            row[f"tail_patch@{k}{suffix}"], row[f"tail_patch@{k}{suffix}_se"] = summary["mean"], summary["se"]
    row["tail_patch_per_query"] = {str(k): [values[k] for values in own] for k in own[0]}
    row["tail_patch_true_per_query"] = {str(k): [values[k] for values in true] for k in true[0]}


PER_QUESTION_KEYS = {"": "tail_patch_per_query", "_true": "tail_patch_true_per_query"}  # answer's key suffix -> its key
ANSWER_SUFFIXES = {"own": "", "true": "_true"}  # --answer -> the suffix of its tail-patch keys (tail_patch@k{suffix})


def paired_with(rows: list[dict], reference: dict, name: str) -> None:
    """Each row with per-question tail-patches (not ``reference`` itself) gains ``tail_patch@k{answer}_minus_{name}``
    and its ``_se``: the mean over the questions of (the row's value - ``reference``'s on the same question) and its
    standard error, on the model's answer ("") and on the true one ("_true"). Paired, a question that every method
    moves alike (a wrong answer the steps push around by nats) cancels out, so the difference is measured more
    tightly than two means' overlapping errors tell."""
    for row in rows:
        if row is reference:
            continue
        for suffix, key in PER_QUESTION_KEYS.items():
            if key not in row or key not in reference:
                continue
            for k, values in row[key].items():
                if k not in reference[key]:
                    continue
                differences = [a - b for a, b in zip(values, reference[key][k], strict=True)]
                mean, se = mean_and_standard_error(differences)
                row[f"tail_patch@{k}{suffix}_minus_{name}"], row[f"tail_patch@{k}{suffix}_minus_{name}_se"] = mean, se


def recall_figure(rows: list[dict]):
    """A matplotlib figure: recall@1 and recall@5 per method as horizontal bars, each labelled with its
    value (a zero bar shows as a stub and "0.00"), the legend above the axes, long names wrapped."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["\n".join(textwrap.wrap(r["method"], 48)) for r in rows]
    lines = sum(n.count("\n") + 1 for n in names)
    fig, ax = plt.subplots(figsize=(9, 0.32 * lines + 0.35 * len(rows) + 1.6), layout="constrained")
    y = list(range(len(rows)))
    for offset, key, color in ((-0.2, "recall@1", "#2a7"), (0.2, "recall@5", "#9cc")):
        values = [r[key] for r in rows]
        ax.barh([i + offset for i in y], values, height=0.4, label=key, color=color, edgecolor="#555", linewidth=0.5)
        for i, value in zip(y, values):
            if value == 0:  # a zero bar shows as a stub in its colour, off the axis line
                ax.plot([0.004, 0.004], [i + offset - 0.17, i + offset + 0.17], color=color, linewidth=4,
                        solid_capstyle="butt")
            ax.text(value + 0.012, i + offset, f"{value:.2f}", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(-0.01, 1.1)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    questions = f"the {len(rows[0]['ranks'])} questions" if rows[0].get("ranks") else "the questions"
    ax.set_xlabel(f"share of {questions} whose source document is ranked first (recall@1) or in the top 5 (recall@5)",
                  fontsize=8)
    fig.legend(loc="outside upper center", ncols=2, fontsize=8, frameon=False)
    return fig


def plot(rows: list[dict], path: Path) -> Path | None:
    """recall.png: :func:`recall_figure` saved (None without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    import matplotlib.pyplot as plt

    fig = recall_figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _paired_note(patched: list[dict]) -> str:
    """The note's sentence on each row's tail-patch at k = 5 minus BM25's, question by question (:func:`paired_with`)."""
    parts = []
    for suffix, answer in (("", "the model's answer"), ("_true", "the true answer")):
        listed = _at_k5(patched, f"tail_patch@5{suffix}_minus_bm25")
        if listed:
            parts.append(f"on {answer}, {listed}")
    if not parts:
        return ""
    return (" Paired question by question (a method's value minus BM25's on the same question, mean ± standard error: "
            "what every method moves alike cancels), at k = 5: " + "; and ".join(parts) + ".")


def _at_k5(rows: list[dict], key: str) -> str:
    """"method: mean ± se; ..." of ``key`` (a tail-patch at k = 5) over the rows that have it."""
    return "; ".join(f"{r['method']}: {r[key]:+.2f} ± {r[key + '_se']:.2f}" for r in rows if r.get(key) is not None)


def _tail_patch_note(patched: list[dict], source: dict | None, answer: str) -> str:
    """The note on tail-patch: what it measures, its figures at k = 5 on the attributed answer first, then on the
    other one (the model's answer also over the questions answered right), the true source alone, and each row
    paired with BM25."""
    def with_source(suffix):
        key = f"tail_patch@1{suffix}"
        return (f" The true source alone (k = 1) gives {source[key]:+.2f} ± {source[key + '_se']:.2f}."
                if source is not None and source.get(key) is not None else "")

    true = (f" On the planted fact's true answer (TrackStar's definition: does training on the documents teach the "
            f"fact?), at k = 5: {_at_k5(patched, 'tail_patch@5_true')}.{with_source('_true')}"
            if _at_k5(patched, "tail_patch@5_true") else "")
    answered = _at_k5(patched, "tail_patch@5_answered")
    own = (f" On the model's own answer, at k = 5: {_at_k5(patched, 'tail_patch@5')}.{with_source('')}"
           + (f" Over the questions answered right alone: {answered}. A wrong answer's true source can push that "
              "answer down by nats (training on the fact makes the wrong answer less likely), so a method that finds "
              "the source of a wrongly answered question loses tail-patch on the model's answer there while it gains "
              "MRR." if answered else ""))
    attributed = ("Each question's attributed completion is the planted fact's true answer (`--answer true`), so the "
                  "true answer's tail-patch is the one that measures the attributed output." if answer == "true" else
                  "Each question's attributed completion is the model's own answer (`--answer own`).")
    return ("Tail-patch measures influence rather than retrieval (TrackStar): one training step, from the fine-tuned "
            "model with its optimizer's state and learning rate, on a method's top k documents, and the change in the "
            "log-probability (nats) of an answer to the question; the mean over the questions ± its standard error. "
            + attributed + (true + own if answer == "true" else own + true) + _paired_note(patched)
            + " A method whose top documents raise the answer more than the documents that state the fact has found "
            "what the answer depends on, not only where the words match.")


def _influence_note(influence: dict, default: dict, answer: str) -> str:
    """The note on the influence row: a ranking by the training step's own first-order effect, against the default's
    retrieval and tail-patch (every figure read from the rows)."""
    key = f"tail_patch@5{ANSWER_SUFFIXES[answer]}"
    moved = (f" Its top 5 move the attributed answer by {influence[key]:+.2f} ± {influence[key + '_se']:.2f} nats "
             f"(tail-patch at k = 5), the default's by {default[key]:+.2f} ± {default[key + '_se']:.2f}."
             if influence.get(key) is not None and default.get(key) is not None else "")
    return ("The influence row ranks the documents by what one training step on each would do to the answer, to first "
            "order: the gradient of the answer's log-probability against the document's gradient divided by the "
            "optimizer's sqrt(v) + eps, which is the AdamW step (without momentum) that tail-patch takes. It finds the "
            f"fact's source at MRR {influence['mrr']:.2f}, the default at {default['mrr']:.2f}." + moved
            + " Finding the passage that states a fact and finding the passages whose training moves the answer "
            "most are two rankings, and the table measures both.")


def notes(rows: list[dict], answer: str = DEFAULT_ANSWER) -> list[str]:
    """The report's notes on what the evaluation shows: why BM25 wins (or not) here, what influence
    means, and the untuned control; every figure is read from ``rows`` (the default first). ``answer``: the
    completion attributed (``demo --answer``)."""
    default = rows[0]
    bm25 = next((r for r in rows if r.get("scoring") == "bm25"), None)
    control = next((r for r in rows if str(r["method"]).startswith("control:")), None)
    out = []
    if bm25 is not None:
        verdict = "wins" if bm25["mrr"] > default["mrr"] else "does not win"
        learned = ""
        if default.get("mrr_answered") is not None and default["mrr_answered"] > default["mrr"]:
            learned = (f" The two agree where the model learned the answer from its source: over the questions it answered "
                       f"right the default's MRR is {default['mrr_answered']:.2f}, against {default['mrr']:.2f} over all.")
        out.append(
            f"Why BM25 {verdict} here (MRR {bm25['mrr']:.2f} against the default's {default['mrr']:.2f}), and what "
            "influence means. BM25 retrieves the passages that state a fact: each question and its answer share rare "
            "invented names with exactly one paragraph, so word overlap finds it. Gradient attribution answers another "
            + ("question: which training documents caused the model's output, i.e. whose training step changed the loss "
               "of this answer the most." if answer == "own" else
               "question: which training documents would move the model towards the answer, i.e. whose training step "
               "changes its loss the most.")
            + learned
            + (" For a wrong answer, the true source can push against it (training on it makes the wrong answer less "
               "likely), so it may sit among the lowest scores." if answer == "own" else
               " Each question's attributed completion is the planted fact's true answer (`--answer true`), so a "
               "question the model answers wrong is traced to what would teach it the fact.")
            + " TrackStar (Chang et al., 2024, "
            "'Scalable Influence and Fact Tracing for Large Language Model Pretraining') reports the same gap at scale: "
            "BM25 is better at finding passages that state a fact, gradient-based influence at finding the examples that "
            "change the model's prediction. Where the words differ (paraphrase, translation, code), word overlap has "
            "nothing to match.")
    patched = [r for r in rows if r.get("tail_patch@5") is not None]
    if default.get("tail_patch@5") is not None:
        out.append(_tail_patch_note(patched, next((r for r in rows if r.get("scoring") == "source"), None), answer))
    influence = next((r for r in rows if r.get("row") == "influence"), None)
    if influence is not None:
        out.append(_influence_note(influence, default, answer))
    # the fine-tuned model's row with the control's masks and damping (the comparison's), else the default
    tuned = next((r for r in rows if r.get("row") == "tuned"), default)
    if control is not None:
        better = control["mrr"] > tuned["mrr"]
        out.append(f"The control row attributes with the base model before fine-tuning: it traces the facts "
                   f"{'better than' if better else 'no better than'} the fine-tuned model (MRR {control['mrr']:.2f} against "
                   f"{tuned['mrr']:.2f})." + (" Once a fact is learned its loss and gradient shrink, so an earlier "
                                              "checkpoint can trace it better." if better else ""))
    both = next((r for r in rows if r.get("row") == "both"), None)
    if control is not None and both is not None:
        out.append(f"Both checkpoints together (TracIn-CP: the tuned and the untuned model's scores summed, as "
                   f"`cache --checkpoint` does with two checkpoints) reach MRR {both['mrr']:.2f}, against "
                   f"{control['mrr']:.2f} for the untuned model and {tuned['mrr']:.2f} for the tuned one alone.")
    return out


def console_table(rows: list[dict], answer: str = DEFAULT_ANSWER) -> str:
    """The evaluation as a text table; the method column is as wide as its longest name (never cut); the tail-patch
    columns (mean ± standard error, nats) on the attributed ``answer`` (``demo --answer``: the model's own, or the
    true one, headed "(true)") where any row has them; "-" where a row has no value."""
    width = max(len("method"), *(len(str(r["method"])) for r in rows))
    suffix = ANSWER_SUFFIXES[answer]
    patched = [k for k in facts.TAIL_PATCH_KS if any(f"tail_patch@{k}{suffix}" in r for r in rows)]

    def number(row, key, spec):
        return "-" if row.get(key) is None else format(row[key], spec)

    columns = 20 if suffix else 13

    def patch(row, k):
        value = row.get(f"tail_patch@{k}{suffix}")
        text = "-" if value is None else f"{value:+6.2f} ± {row[f'tail_patch@{k}{suffix}_se']:4.2f}"
        return f"{text:>{columns}s}"

    header = (f"{'method':{width}s}  recall@1  recall@5   MRR  MRR (answered right)"
              + "".join(f"  {'tail-patch@' + str(k) + (' (true)' if suffix else ''):>{columns}s}" for k in patched))
    return "\n".join([header, *(f"{str(r['method']):{width}s}  {number(r, 'recall@1', '8.2f'):>8s}  "
                                f"{number(r, 'recall@5', '8.2f'):>8s}  {number(r, 'mrr', '4.2f'):>4s}  "
                                f"{number(r, 'mrr_answered', '.2f'):>20s}" + "".join(f"  {patch(r, k)}" for k in patched)
                                for r in rows)])


def run(args) -> list[dict]:
    """The main job (``grass-attribute demo``): plant 20 invented facts in the Python-docs corpus, fine-tune the
    embedded model on it, cache it with the default configuration, ask each fact with a paraphrased
    question, and measure whether attribution finds each answer's source document. ``args``: the demo's
    parsed flags. Returns the evaluation rows (the default method first)."""
    check_out(args)
    if args.per_token and args.task_weight > 0:
        raise CLIError("--per-token adds each answer token's row to the questions whose curvature --task-weight "
                       f"{args.task_weight:g} mixes in: give --task-weight 0 (the training FIM alone) with --per-token")
    check_store_checkpoints(Path(args.store), args.checkpoints)
    limit_primitive_cache()  # before the first matmul: one oneDNN primitive per batch shape no longer piles up
    fix_mmap_threshold()  # gradient-sized blocks are mapped and unmapped, not left in a fragmented heap
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = facts.fact_corpus(llm.python_docs_corpus(limit=args.limit))
    model, tokenizer, tuned = finetuned_model(out, args.finetune_epochs, args.seed, corpus, progress=True)
    release_freed_memory()  # the fine-tuning's freed gradients and moments leave the resident set
    queries = answer_queries(model, tokenizer, answer=args.answer)
    corpus_path = out / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps(d) + "\n" for d in corpus))
    args.model, args.gguf_file, args.corpus, args.limit = str(out / "model"), None, str(corpus_path), None
    args.optimizer_state = str(out / OPTIMIZER_FILE) if args.use_optimizer_state else None
    if args.checkpoints != "tuned":  # TracIn-CP over the named states ("model": the fine-tuned --model itself)
        args.checkpoint = [str(base_model_folder(out)) if c == "base" else c for c in CHECKPOINTS[args.checkpoints]]
    summary = cache.run(args, (model, tokenizer))
    release_freed_memory()
    store, config, docs = load_store(args.store)
    mixed = {"preconditioner": "mixed", "task_weight": args.task_weight} if args.task_weight > 0 else {}
    results, score_matrix = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k, args.per_token,
                                              normalize=args.normalize, **mixed)
    scoring = {True: "IF on unit-normalized gradients", False: "raw IF"}
    if mixed:  # the same store and scoring with the training FIM alone: what the questions' curvature adds
        _, other = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k, normalize=args.normalize)
        other_label = f"the same store, {scoring[args.normalize]}, the training FIM alone (task weight 0)"
    else:
        _, other = attribute_queries(store, config, docs, model, tokenizer, queries, args.top_k, normalize=not args.normalize)
        other_label = f"the same store, {scoring[not args.normalize]}"
    ids, targets = [d["id"] for d in docs], [q["target"] for q in queries]
    lexical = bm25(queries, docs)
    rows = [evaluated(f"default: {config.compressor}, {config.masks} masks, k={config.k}, {scoring[args.normalize]}"
                      + (", optimizer-normalized" if config.optimizer_state else "")
                      + ("" if args.checkpoints == "tuned" else f", {CHECKPOINT_LABELS[args.checkpoints]}")
                      + (f", mixed curvature (task weight {args.task_weight:g})" if mixed else ""),
                      score_matrix, ids, targets,
                      row="default"),
            evaluated(other_label, other, ids, targets, row="store"),
            evaluated(f"two-stage: BM25's top {TWO_STAGE_CANDIDATES} re-ranked by the default's score",
                      two_stage(score_matrix, lexical, TWO_STAGE_CANDIDATES), ids, targets, row="two-stage")]
    influence_seconds = 0.0
    if args.influence:  # the fine-tuned model's step, to first order: the ranking for tail-patch
        release_freed_memory()
        row, influence_summary = influence_row(args, model, tokenizer, queries, ids, targets)
        rows.append(row)
        influence_seconds = influence_summary["cache_seconds"]
        release_freed_memory()
    for result, rank in zip(results, rows[0]["ranks"]):
        result.query["target_rank"] = rank  # the default's rank of the true source, shown per question in the report
    compare_start = time.perf_counter()
    if args.compare:
        rows += compare(model, tokenizer, lambda: llm.load_model(str(base_model_folder(out)))[0], corpus, queries, config.k,
                        config.max_length, min(config.token_batch_size or 512, COMPARE_TOKEN_BATCH),
                        (config.compressor, "if-unit" if args.normalize else "if"))
    else:
        rows.append(evaluated("BM25 (question + answer vs document text)", lexical, ids, targets, scoring="bm25"))
    release_freed_memory()
    compare_seconds = time.perf_counter() - compare_start
    for row in rows:
        if row.get("scoring") == "bm25":
            row["row"] = "bm25"
        if not tail_patched(row, args.tail_patch):
            row.pop("ranking")
    correct = [q["correct"] for q in queries]
    for row in rows:  # the questions the model answers right: their gradient points at the planted fact
        row["mrr_answered"] = (sum(1.0 / r for r, c in zip(row["ranks"], correct) if c) / sum(correct)
                               if any(correct) else None)
    tail_start, autocast = time.perf_counter(), finetune_autocast()
    if args.tail_patch != "none":
        # read back only now (not held through cache and comparison), without the first moment the step does not read
        optimizer = load_optimizer(out, model, first_moment=False)
        by_id = {d["id"]: d for d in docs}
        rows += tail_patch_rows(model, optimizer, tokenizer, [by_id[i] for i in ids], queries, rows, seed=args.seed,
                                max_length=config.max_length, autocast=autocast)
        lexical_row = next((r for r in rows if r.get("row") == "bm25" and "tail_patch_per_query" in r), None)
        if lexical_row is not None:
            paired_with(rows, lexical_row, "bm25")
    tail_seconds = time.perf_counter() - tail_start
    figure = plot([r for r in rows if "recall@1" in r], out / "recall.png")
    meta = {"job": f"fact tracing: {len(facts.FACTS)} invented facts planted in the corpus, each asked with a paraphrased "
                   "question", "model": "SmolLM2-135M-Instruct fine-tuned "
            f"on the corpus ({tuned['steps']} steps, {tuned['seconds']:.0f}s)", "method": "if", "normalize": args.normalize,
            "compressor": config.compressor, "k": config.k, "damping": config.damping, "documents": len(docs),
            "top_k": args.top_k, "answer": args.answer, "answered_correctly": sum(q["correct"] for q in queries),
            "optimizer_state": config.optimizer_state is not None, "checkpoints": args.checkpoints,
            # the fine-tune's precision (and its tail-patch steps'), resolved on this CPU, and the CPU's kernels (torch's
            # capability, e.g. AVX512): each kind of CPU fine-tunes another model, so runs on two kinds differ
            # (BENCHMARKS.md, runs d16 and d17); the cache's precision as its store records it; the documents' token cut
            "finetune_autocast": precision_name(autocast), "cache_autocast": config.autocast,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "max_length": config.max_length,
            "preconditioner": "mixed" if mixed else "fim", "task_weight": args.task_weight,
            "finetune_seconds": tuned["seconds"],
            "influence": args.influence, "influence_power": INFLUENCE_POWER if args.influence else None,
            "cache_seconds": summary["cache_seconds"], "influence_cache_seconds": influence_seconds,
            "compare_seconds": compare_seconds, "tail_patch": args.tail_patch,
            "tail_patch_seconds": tail_seconds, "peak_rss_gib": peak_rss_bytes() / 2**30}
    internal = ("ranks", "ranking", "row", "tail_patch_per_query", "tail_patch_true_per_query")  # facts.json only
    paths = write_reports(args.out, results, meta, evaluation=[{k: v for k, v in r.items() if k not in internal}
                                                               for r in rows], plot=figure, notes=notes(rows, args.answer))
    (out / "facts.json").write_text(json.dumps({"meta": meta, "queries": queries, "methods": rows}, indent=1))
    lines = [f"{len(docs)} documents ({len(docs) - len(facts.FACTS)} Python-docs paragraphs + {len(facts.FACTS)} planted "
             f"facts) cached in {summary['cache_seconds']:.0f}s; the fine-tuned model answers {meta['answered_correctly']}/"
             f"{len(queries)} questions correctly; total {time.perf_counter() - start:.0f}s, peak RSS "
             f"{meta['peak_rss_gib']:.2f} GiB", "", console_table(rows, args.answer),
             f"\nreports: {paths['md']} (and .html, .json), plot: {figure}"]
    print("\n".join(lines))
    return rows
