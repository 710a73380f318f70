"""``grass-attribute demo``: the main job (attribution.llm.demo), fact tracing on the embedded model, measured."""
from __future__ import annotations

import argparse

from ..config import ANSWERS, DEFAULT_ANSWER
from . import flags as f
from .cache import CONFIG_FLAGS, DEFAULTS

DEMO_TASK_WEIGHT = 0.5  # equal shares of the training and the questions' curvature: chosen before measuring, not fitted

# the cache flags the demo takes; its model and corpus are its own (the fine-tuned model, the facts' corpus)
CACHED = {"compressor", "k", "max_length", "batch_size", "token_batch_size", "storage_dtype", "dtype", "autocast", "damping",
          "seed", "layers", "limit", "masks", "mask_documents"}
FIXED = ("model", "gguf_file", "adapter", "corpus", "dataset", "split", "text_field", "prompt_field", "completion_field", "messages_field",
         "optimizer_state", "optimizer_power", "checkpoint", "checkpoint_weight", "preconditioner", "curvature_documents")


def run(args):
    """The main job (attribution.llm.demo.run): plant 20 invented facts in the Python-docs corpus, fine-tune the
    embedded model on it, cache it with the default configuration, ask each fact with a paraphrased
    question, and measure whether attribution finds each answer's source document."""
    from .. import demo

    return demo.run(args)


COMMAND = f.Command("demo", "the main job: fact tracing on the embedded model, measured", [
    *(flag for flag in CONFIG_FLAGS if flag.key in CACHED), *f.COMPILE,
    f.Flag("--store", "where the demo caches its corpus", default="out/llm/store"),
    f.Flag("--out", "folder of the fine-tuned model, the reports and recall.png", default="out/llm"),
    f.Flag("--finetune-epochs", "epochs of the short fine-tune", default=6, type=f.positive_int),
    f.Flag("--top-k", "documents listed per question, top and bottom", default=5, type=f.positive_int),
    f.Flag("--per-token", "also list each answer token's top documents (needs --task-weight 0: otherwise the token "
                            "rows would join the questions' curvature)", default=False, action="store_true"),
    f.Flag("--optimizer-state", "divide every cached and query gradient by sqrt(v) + eps, v the fine-tuning's AdamW "
                                "second moment (TrackStar; `cache --optimizer-state`; default: off, it traced the facts "
                                "worse here, BENCHMARKS.md)", default=False, action=argparse.BooleanOptionalAction,
           dest="use_optimizer_state"),
    f.Flag("--checkpoints", "whose gradients the default caches and scores: the fine-tuned model, the untuned base model "
                            "(saved once as <out>/base_model), or both (TracIn-CP, equal weights; `cache --checkpoint`); "
                            "another choice needs another --store (default: both: the untuned model keeps large gradients on "
                            "the facts that the tuned one has learned; BENCHMARKS.md)", default="both", choices=["tuned", "base", "both"]),
    f.Flag("--task-weight", "the default's curvature: (1 - w) F_train + w F_questions per block, the questions' share w in "
                            "[0, 1), so directions every question shares (the question template) weigh less (TrackStar's "
                            "mixed Hessian; `attribute --preconditioner mixed --task-weight W`); 0: the training FIM alone "
                            "(default: 0.5, equal shares)", default=DEMO_TASK_WEIGHT, type=f.task_weight),
    f.Flag("--answer", "the completion whose training documents are sought: the planted fact's true answer (true: which "
                       "documents teach the fact; tail-patch then measures it) or the model's own answer to each "
                       "question (own: why did it say this); BM25 and every row read the same text (default: true: "
                       "it traced and moved the facts better here, BENCHMARKS.md)", default=DEFAULT_ANSWER,
           choices=list(ANSWERS)),
    f.Flag("--influence", "also the influence row: the fine-tuned model's gradients divided by (sqrt(v) + eps) ** 0.5 "
                          "(v: the fine-tuning's AdamW second moment; `cache --optimizer-state --optimizer-power 0.5`) "
                          "into <store>-influence, ranked by GradDot: the training step's first-order effect on each "
                          "answer, what tail-patch measures (one more pass over the corpus)", default=True,
           action=argparse.BooleanOptionalAction),
    f.Flag("--compare", "also the other compressors and scorings and the untuned model's gradients (one more pass over the "
                        "corpus per model: most of the job's time and memory)", default=True,
           action=argparse.BooleanOptionalAction),
    f.Flag("--tail-patch", "TrackStar's influence metric (one training step on each method's top 1, 5 and 10 documents): "
                           "main (the default, BM25, two-stage and influence, with the random and true-source references), all "
                           "(every row, the store's other row included) or none", default="main",
           choices=["main", "all", "none"]),
    f.NORMALIZE,
], run, defaults={key: getattr(DEFAULTS, key) for key in FIXED})
