"""A finished ``grass-attribute demo --out`` folder, as the scripts that measure it again read it
(``scripts/tail_patch_headroom.py``, ``trackstar_tail_patch.py``, ``tail_patch_memory.py``, ``bench_tail_patch.py``):
its facts.json record, its corpus and questions, the precision and token cut its tail-patch stepped in, and its
fine-tuned model and optimizer, loaded on demand. One place for it, so that every script steps as the run did (the
run's recorded precision, not this CPU's: BENCHMARKS.md, runs d16 and d17)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .demo import OPTIMIZER_FILE, load_optimizer, recorded_autocast

FACTS_JSON, CORPUS_JSONL, MODEL_FOLDER = "facts.json", "corpus.jsonl", "model"
DEFAULT_MAX_LENGTH = 128  # the token cut of a facts.json written before its meta recorded "max_length"


@dataclass(frozen=True)
class DemoRun:
    """A demo folder's record (facts.json: {"meta", "queries", "methods"}) and corpus (corpus.jsonl, in order)."""

    folder: Path
    record: dict
    corpus: list[dict]

    @classmethod
    def read(cls, folder) -> "DemoRun":
        """Read ``folder``; a folder without the demo's facts.json, corpus.jsonl, model or optimizer.pt is refused,
        naming what is missing."""
        folder = Path(folder)
        missing = [name for name in (FACTS_JSON, CORPUS_JSONL, MODEL_FOLDER, OPTIMIZER_FILE) if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(f"--demo {folder} holds no {', '.join(missing)}: give the --out folder of a finished "
                                    f"`grass-attribute demo` run")
        record = json.loads((folder / FACTS_JSON).read_text())
        if not isinstance(record, dict) or not {"queries", "methods"} <= set(record):
            raise ValueError(f"--demo {folder}: {FACTS_JSON} is not a demo record (its keys: "
                             f"{sorted(record) if isinstance(record, dict) else type(record).__name__})")
        corpus = [json.loads(line) for line in (folder / CORPUS_JSONL).read_text().splitlines() if line.strip()]
        return cls(folder, record, corpus)

    @property
    def meta(self) -> dict:
        """The run's meta ({} for a record without one: every default then applies)."""
        return self.record.get("meta", {})

    @property
    def queries(self) -> list[dict]:
        return self.record["queries"]

    @property
    def methods(self) -> list[dict]:
        """The evaluation rows, the default first."""
        return self.record["methods"]

    @property
    def answer(self) -> str:
        """The completion the rows attributed: "true" or "own" (a facts.json written before ``--answer``: own)."""
        return self.meta.get("answer", "own")

    @property
    def autocast(self):
        """The precision the run fine-tuned and tail-patched in (:func:`demo.recorded_autocast`)."""
        return recorded_autocast(self.meta)

    @property
    def max_length(self) -> int:
        """The documents' token cut of the run's cache and tail-patch."""
        return int(self.meta.get("max_length", DEFAULT_MAX_LENGTH))

    def model(self):
        """(model, tokenizer): the fine-tuned model."""
        from .. import llm

        return llm.load_model(str(self.folder / MODEL_FOLDER))

    def optimizer(self, model, first_moment: bool = False):
        """The fine-tuning's AdamW with its saved state, on ``model``; without the first moment by default, as the
        demo's tail-patch holds it (:func:`demo.load_optimizer`)."""
        return load_optimizer(self.folder, model, first_moment=first_moment)

    def step_options(self, tokenizer, max_length: int | None = None) -> dict:
        """The keyword arguments of facts.tail_patch_rankings that step as the run did: its tokenizer, token cut
        (``max_length`` overrides it) and precision."""
        return {"tokenizer": tokenizer, "max_length": max_length or self.max_length, "autocast": self.autocast}


__all__ = ["DemoRun"]
