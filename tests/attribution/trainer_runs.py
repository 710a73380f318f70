"""Training runs of a tiny random Llama under the Hugging Face Trainer with GradientCacheCallback, for the tests:
in this process, or as a script (a fresh process, a killed run, or 2 gloo ranks under torchrun) that writes what it
recorded to --report (rank 0). Every run snapshots the weights each recorded step was taken at, so that the tests
can recompute each row's per-sample gradient from them."""
import argparse
import json
import os
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from attribution import Attributor
from attribution.integrations import GradientCacheCallback, causal_lm_loss, example_digest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 64
# the callbacks' and the references' compressor
OPTIONS = {"compressor": "factgrass:blowup=4", "k": 16, "seed": 3, "layers": ["model.layers.*"]}


def tiny_model(hidden: int = 32, dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, attention_dropout=dropout))


def examples(n: int = 7) -> list[dict]:
    """n token sequences of 4..11 tokens (distinct)."""
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


def collate(rows: list[dict]) -> dict:
    """Right-padded input_ids / attention_mask / labels (-100 on padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


QUERIES = [collate(examples(9)[7:9]), collate(examples(10)[9:])]  # 3 queries, not training examples


class Snapshots(TrainerCallback):
    """The weights and learning rate of every step ``records`` chooses, taken before its optimizer step."""

    def __init__(self, records):
        self.records, self.weights, self.lrs = records, {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        step = state.global_step + 1
        if self.records(step):
            self.weights[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.lrs[step] = float(lr_scheduler.get_last_lr()[0])


class StopAt(TrainerCallback):
    """Kills the process (no cleanup, as a crash) when optimizer step ``step`` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os._exit(3)


def train(out: str, callbacks: list, *, max_steps: int = 4, batch: int = 3, accumulation: int = 1, n: int = 7,
          save_steps: int | None = None, resume: str | None = None, model=None, ranks: bool = False):
    """Trainer.train() of the tiny model (or ``model``) over ``examples(n)``; returns the trained model."""
    model = tiny_model() if model is None else model
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             max_steps=max_steps, learning_rate=5e-2, lr_scheduler_type="linear", report_to=[],
                             use_cpu=True, seed=0, remove_unused_columns=False, logging_strategy="no",
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             disable_tqdm=True, **({"ddp_backend": "gloo"} if ranks else {}))
    Trainer(model=model, args=args, train_dataset=examples(n), data_collator=collate, callbacks=callbacks).train(
        resume_from_checkpoint=resume)
    return model


def reference_rows(weights: dict, rows: list[dict], hidden: int = 32) -> torch.Tensor:
    """[len(rows), columns]: each recorded row's example compressed alone, at the weights of its step."""
    by_digest = {example_digest(torch.tensor(e["input_ids"])): e for e in examples(64)}
    out = []
    for row in rows:
        model = tiny_model(hidden)
        model.load_state_dict(weights[row["step"]])
        attr = Attributor(model, causal_lm_loss, compile=False, progress=False, **OPTIONS)
        out.append(attr.compress_batch(collate([by_digest[row["digest"]]]))[0][0])
    return torch.stack(out)


def run_script(*args, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """This file as a script in a fresh process (``ranks`` 2: under torchrun, one thread each)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]
    if ranks > 1:
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([*launcher, __file__, *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store")
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", help="a .pt file: the rows' query scores and the steps' weights (rank 0)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--ranks", action="store_true")
    opts = parser.parse_args()
    callback = GradientCacheCallback(opts.store, queries=QUERIES, every=opts.every, **OPTIONS)
    scores_only = GradientCacheCallback(queries=QUERIES, every=opts.every, **OPTIONS)  # no store
    snapshots = Snapshots(callback.records)
    callbacks = [callback, scores_only, snapshots] + ([StopAt(opts.stop_at)] if opts.stop_at else [])
    train(opts.out, callbacks, max_steps=opts.max_steps, save_steps=opts.save_steps, resume=opts.resume, ranks=opts.ranks)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if opts.report and rank == 0:
        scores, rows = callback.query_scores()
        torch.save({"scores": scores, "rows": rows, "weights": snapshots.weights, "lrs": snapshots.lrs,
                    "scores_only": scores_only.query_scores()}, opts.report)
    print(json.dumps({"rank": rank, "recorded": len(callback._local)}))


if __name__ == "__main__":
    main()
