"""The main job: fact tracing with the embedded SmolLM2, end to end, measured.

1. Twenty invented facts are planted in the Python-docs corpus (attribution.facts), and the model is
   briefly fine-tuned on that corpus (seeded, CPU; the weights are kept in ``out/model`` and reused).
2. The corpus is cached with the CLI's default configuration (the real pipeline: store, resume,
   checksums), and each fact is asked with a paraphrased question; the model's own answer is the
   completion whose training documents we look for.
3. The default method's top documents per question are reported (report.md / .html / .json), with
   recall@1, recall@5 and MRR of each fact's source document, beside the other compressors and
   scorings, a lexical BM25 baseline and the untuned model, and a plot of recall per method.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import facts, llm
from .fidelity import Method, measure, scores
from .layers import find_layers


def finetuned_model(out: Path, epochs: int, seed: int, corpus: list[dict], progress: bool = True):
    """(model, tokenizer, info): the embedded SmolLM2 fine-tuned on ``corpus``, trained once and
    saved under ``out`` (reused when its recorded configuration matches)."""
    autocast = torch.bfloat16 if llm.fast_bfloat16() else None
    config = {"base": llm.DEFAULT_MODEL, "epochs": epochs, "seed": seed, "lr": 2e-4, "corpus_per_epoch": 12,
              "autocast": str(autocast), "documents": [d["id"] for d in corpus]}
    folder, record = out / "model", out / "model.json"
    if record.is_file() and json.loads(record.read_text()).get("config") == config and (folder / "config.json").is_file():
        model, tokenizer = llm.load_model(str(folder))
        return model, tokenizer, json.loads(record.read_text())["info"]
    torch.manual_seed(seed)
    model, tokenizer = llm.load_model(llm.DEFAULT_MODEL)
    info = facts.finetune(model, tokenizer, corpus, epochs=epochs, lr=config["lr"], seed=seed,
                          corpus_per_epoch=config["corpus_per_epoch"], progress=progress, autocast=autocast)
    save_folder(model, tokenizer, folder)
    record.write_text(json.dumps({"config": config, "info": info}, indent=1))
    return model, tokenizer, info


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


def answer_queries(model, tokenizer, max_new_tokens: int = 16) -> list[dict]:
    """Each fact's paraphrased question, completed by the model (its first line)."""
    prompts = [facts.question_prompt(f) for f in facts.FACTS]
    answers = [a.split("\n")[0] for a in llm.complete(model, tokenizer, prompts, max_new_tokens)]
    return [{"id": f.id, "prompt": p, "completion": a if a.strip() else " " + f.answer, "target": f.id,
             "correct": facts.answered(f, a)} for f, p, a in zip(facts.FACTS, prompts, answers)]


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
    and the default compressor spec (random masks) with the untuned model's gradients."""
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
    for name, method in methods.items():
        metrics = facts.retrieval_metrics(scores(features[name], method), ids, targets)
        spec = str(method.compressor)
        label = f"the default spec with random masks ({spec}), {method.scoring}" if name == "default" else name
        rows.append({"method": label, "compressor": str(method.compressor), "scoring": method.scoring, **metrics})
    rows.append({"method": "BM25 (question + answer vs document text)", "compressor": None, "scoring": "bm25",
                 **facts.retrieval_metrics(facts.bm25_scores([q["prompt"] + " " + q["completion"] for q in queries],
                                                             [d["text"] for d in ordered]), ids, targets)})
    base_layers = find_layers(base_model, llm.DEFAULT_LAYERS[:1])
    _, base = measure(base_model, llm.sequence_loss, base_layers, doc_batches, query_batches,
                      {"default": methods["default"]}, truth=False)
    rows.append({"method": "untuned model, the default spec with random masks", "compressor": str(default[0]), "scoring": default[1],
                 **facts.retrieval_metrics(scores(base["default"], methods["default"]), ids, targets)})
    for row in rows:
        row["seconds"] = time.perf_counter() - start
    return rows


def plot(rows: list[dict], path: Path) -> Path | None:
    """A horizontal bar chart of recall@1 and recall@5 per method (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["method"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["recall@5"] for r in rows], height=0.4, label="recall@5", color="#9cc")
    ax.barh([i - 0.2 for i in y], [r["recall@1"] for r in rows], height=0.4, label="recall@1", color="#2a7")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the 20 planted facts whose source document is retrieved")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
