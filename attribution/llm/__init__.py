"""Causal language models, the application of the attribution pipeline to them, in the order of the pipeline:

- :mod:`.models`: loading (any HF AutoModelForCausalLM, or the embedded SmolLM2 GGUF), dtypes, the
  layers to attribute, greedy completions;
- :mod:`.corpora`: corpora (the embedded Python-docs paragraphs, .jsonl / .txt files, Hugging Face
  datasets) and query sets (prompts, lm-eval tasks);
- :mod:`.tokens`: length-grouped token batches and the per-sample LM loss;
- :mod:`.report`: the reports (report.json / .md / .html);
- :mod:`.config`, :mod:`.commands` and :mod:`.cli`: the ``grass-attribute`` command line; :mod:`.demo`
  (the main job) and :mod:`.bench` (throughput) behind two of its commands.

A batch is a dict of ``input_ids`` [B, T], ``attention_mask`` [B, T] and ``loss_mask`` [B, T] (which
target tokens count: every real token of a training document; only the completion of a query).
The per-sample loss is the summed next-token cross-entropy over the masked targets.

Every name is re-exported here, and the modules that use them call them through this package
(``llm.document_batches``), so that a patch of ``attribution.llm.X`` takes effect everywhere.
"""
from __future__ import annotations

from .corpora import (
    DEFAULT_PROMPTS,
    chat_document,
    lm_eval_queries,
    load_documents,
    python_docs_corpus,
    read_corpus,
    read_dataset,
    read_jsonl,
    read_text,
)
from .models import (
    DEFAULT_LAYERS,
    DEFAULT_MODEL,
    DTYPES,
    SMOLLM2_GGUF,
    UsageError,
    apply_adapter,
    check_adapter_folder,
    complete,
    fast_bfloat16,
    load_model,
    load_state,
    resolve_layers,
    smollm2_location,
)
from .tokens import (
    chunked_sequence_loss,
    document_batches,
    document_tokens,
    encoded_batches,
    length_batches,
    pad_batch,
    per_token_queries,
    query_batches,
    query_tokens,
    sequence_loss,
)

__all__ = ["DEFAULT_LAYERS", "DEFAULT_MODEL", "DEFAULT_PROMPTS", "DTYPES", "SMOLLM2_GGUF", "UsageError",
           "apply_adapter", "chat_document", "check_adapter_folder", "chunked_sequence_loss", "complete", "document_batches",
           "document_tokens", "encoded_batches", "fast_bfloat16", "length_batches", "lm_eval_queries",
           "load_documents", "load_model", "load_state", "pad_batch", "per_token_queries", "python_docs_corpus",
           "query_batches", "query_tokens", "read_corpus", "read_dataset", "read_jsonl", "read_text",
           "resolve_layers", "sequence_loss", "smollm2_location"]
