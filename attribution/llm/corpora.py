"""Corpora and query sets: the embedded Python-docs corpus, .jsonl / .txt corpora, Hugging Face datasets
(text, prompt/completion or chat rows), and lm-eval tasks as (prompt, completion) queries."""
from __future__ import annotations

import json
import re
from pathlib import Path


def load_documents(config, tokenizer) -> list[dict]:
    """The documents a cache config names (a CacheConfig, or a dict of its fields): --dataset, else
    --corpus (python-docs by default)."""
    c = config.__getitem__ if isinstance(config, dict) else lambda key: getattr(config, key)
    if c("dataset") is not None:
        return read_dataset(c("dataset"), c("text_field"), c("prompt_field"), c("completion_field"),
                            c("messages_field"), tokenizer, c("split"), c("limit"))
    if c("corpus") in (None, "python-docs"):
        return python_docs_corpus(limit=c("limit"))
    return read_corpus(c("corpus"), c("text_field"), c("limit"))


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
