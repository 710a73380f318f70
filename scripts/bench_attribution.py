#!/usr/bin/env python
"""Cache- and attribute-stage throughput on CPU (JSON). Models with random weights:

* mlp: 784-1024-1024-10, batch 64 (T = 1);
* tiny_gpt: 2 pre-LN blocks, d=256, 4 heads, vocab 2048, T=128, batch 8, every nn.Linear targeted.

Cache stage: samples/s of Attributor's per-batch step (forward + per-sample factors + compression)
for FactGraSS and LoGra, compiled and eager, next to a plain forward + backward (parameter gradients)
of the same model. Attribute stage: scores/s of attribute() against the cached store.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn

from attribution import Attributor
from grass_ops.benchmarking import emit_json_report


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (proj(h).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=2048, d=256, heads=4, blocks=2, t=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def gpt_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").sum(1)


def mlp_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def setup(name, batches, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        data = [(torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)) for _ in range(batches)]
        return model.eval(), mlp_loss, data, 64
    model = TinyGPT()
    data = [torch.randint(0, 2048, (8, 129), generator=gen) for _ in range(batches)]
    return model.eval(), gpt_loss, data, 8


def samples_per_second(fn, data, per_batch, warmup=1):
    for b in data[:warmup]:
        fn(b)
    times = []
    for b in data[warmup:]:
        start = time.perf_counter()
        fn(b)
        times.append(time.perf_counter() - start)
    return per_batch / statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "tiny_gpt"], choices=["mlp", "tiny_gpt"])
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "k_per_layer": args.k, "models": {}}
    for name in args.models:
        model, loss, data, per_batch = setup(name, args.batches)
        row = {}

        def plain(b):
            model.zero_grad(set_to_none=True)
            loss(model, b).sum().backward()

        row["forward_backward_samples_per_s"] = samples_per_second(plain, data, per_batch)
        model.zero_grad(set_to_none=True)
        for comp in ("factgrass", "logra"):
            for compiled in (False, True):
                attr = Attributor(model, loss, compressor=comp, k=args.k, compile=compiled, progress=False)
                key = f"{comp}_{'compiled' if compiled else 'eager'}"
                row[f"cache_{key}_samples_per_s"] = samples_per_second(attr.compress_batch, data, per_batch)
                if compiled:
                    row[f"graph_breaks_{comp}"] = attr.stats["graph_breaks"]
                if comp == "factgrass" and compiled:
                    attr.cache(data)
                    start = time.perf_counter()
                    scores = attr.attribute(data[:1])
                    row["attribute_scores_per_s"] = scores.numel() / (time.perf_counter() - start)
                    row["n_train"] = scores.shape[1]
        row["layers"] = len(attr.layer_names)
        result["models"][name] = row
        print(json.dumps({name: row}), file=sys.stderr)
    emit_json_report(result, args.out)


if __name__ == "__main__":
    main()
