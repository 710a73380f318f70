#!/usr/bin/env python
"""Peak memory of the cache step on Llama-3.1-8B, predicted with fake tensors (no weights, no GPU) and,
with --measure on a GPU, measured beside the prediction. Prints JSON.

    python scripts/predict_memory.py                              # T = 1024, 2048 x B = 1, 4, 8, every path
    python scripts/predict_memory.py --device cuda --measure      # also run each case on the GPU
    python scripts/predict_memory.py --hidden 256 --layers 2 --measure   # a small model, measured on the CPU

Paths: "factors" is the cache step before in-backward compression (every target layer's input and output
gradient captured until the backward ends, then compressed; K-FAC still runs it); "in_backward" is the
cache step now; "activation_backward" is the floor of any per-sample gradient method (a forward and an
activation-gradient backward, nothing captured). bfloat16 weights, every linear layer of the decoder
blocks, FactGraSS at k per layer. The loss runs without an attention mask (an all-ones mask, which
transformers drops anyway), so attention takes the fused kernel, which keeps O(T) statistics for its
backward on the GPU and on the CPU alike. The prediction counts tensor storage (grass_ops.benchmarking.
PeakMemory); the GPU's max_memory_allocated adds the caching allocator's rounding and kernels' workspaces.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from attribution import llm
from attribution.compression import BatchCompressor, build_compressors
from attribution.layers import find_layers
from attribution.llm.bench import activation_backward
from grass_ops.benchmarking import PeakMemory, emit_json_report

LLAMA_3_1_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
PATHS = ("factors", "in_backward", "activation_backward")


def unmasked_loss(model, batch):
    return llm.sequence_loss(model, {**batch, "attention_mask": None})


def build_model(config: dict, device: str):
    """A Llama with random bfloat16 weights made on ``device`` (under a FakeTensorMode: fake ones)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**config)).eval()
    finally:
        torch.set_default_dtype(previous)


def cache_step(model, path: str, batch: dict, compressor: str, k: int, device: str):
    """A function running one cache step of ``path`` on ``batch`` (its shape pass done already)."""
    if path == "activation_backward":
        return lambda: activation_backward(model, unmasked_loss, batch)
    infos = find_layers(model, ["model.layers.*"])
    with unset_fake_temporarily():  # real compressors (their hashes are checked on real values)
        blocks = {n: c.to(device) for n, c in build_compressors(compressor, infos, k, 0).items()}
    step = BatchCompressor(model, infos, [], blocks, torch.float32, torch.device(device), compile=False,
                           return_factors=path == "factors")
    probes = step.probes(unmasked_loss, batch)

    def run():
        with step.capture.hooks():
            return step.raw(unmasked_loss, batch, probes)[:2]

    return run


def token_batch(rows: int, tokens: int, vocab: int, device: str) -> dict:
    ids = torch.randint(0, vocab, (rows, tokens), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def predict(config: dict, path: str, rows: int, tokens: int, compressor: str, k: int) -> dict:
    """Peak and weight bytes of one cache step, from a run on fake tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(config, "cpu")
        batch = token_batch(rows, tokens, config["vocab_size"], "cpu")
        run = cache_step(model, path, batch, compressor, k, "cpu")
        tracker = PeakMemory()
        tracker.track(*model.parameters(), *batch.values())
        weights = tracker.live
        with tracker:
            run()
    return {"predicted_bytes": tracker.peak, "weight_bytes": weights}


def measure(model, config: dict, path: str, rows: int, tokens: int, compressor: str, k: int, device: str) -> dict:
    """Peak bytes over one cache step (after one warm-up step) with real weights: the GPU's
    max_memory_allocated, or on the CPU the same storage count as the prediction; "out of memory" if
    the GPU ran out."""
    batch = token_batch(rows, tokens, config["vocab_size"], device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
    try:
        run = cache_step(model, path, batch, compressor, k, device)
        run()
        tracker = PeakMemory() if not cuda else contextlib.nullcontext()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            tracker.track(*model.parameters(), *batch.values())
        start = time.perf_counter()
        with tracker:
            run()
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if cuda else tracker.peak
        return {"measured_bytes": peak, "seconds": time.perf_counter() - start}
    except torch.OutOfMemoryError:
        return {"measured_bytes": "out of memory"}
    finally:
        if cuda:
            torch.cuda.empty_cache()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048], help="sequence lengths T")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="batch sizes B")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: the real model)")
    parser.add_argument("--hidden", type=int, default=None, help="a smaller model for a quick check: hidden size "
                        "(intermediate 3.5x, heads of 128, vocabulary 32000)")
    parser.add_argument("--compressor", default="factgrass")
    parser.add_argument("--k", type=int, default=256, help="floats per layer")
    parser.add_argument("--measure", action="store_true", help="also run every case on --device with random weights")
    parser.add_argument("--predict", action=argparse.BooleanOptionalAction, default=True,
                        help="predict with fake tensors (--no-predict: measure only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config = {**LLAMA_3_1_8B, "num_hidden_layers": args.layers}
    if args.hidden:
        heads = max(1, args.hidden // 128)
        config.update(hidden_size=args.hidden, intermediate_size=int(3.5 * args.hidden), num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 4), vocab_size=32000)
    if not (args.predict or args.measure):
        parser.error("--no-predict needs --measure")
    report = {"config": config, "dtype": "bfloat16", "compressor": args.compressor, "k": args.k, "cases": []}
    model = build_model(config, args.device) if args.measure else None
    for tokens in args.tokens:
        for rows in args.batch:
            for path in args.paths:
                case = {"batch": rows, "tokens": tokens, "path": path}
                if args.predict:
                    case.update(predict(config, path, rows, tokens, args.compressor, args.k))
                if model is not None:
                    case.update(measure(model, config, path, rows, tokens, args.compressor, args.k, args.device))
                report["cases"].append(case)
                with contextlib.suppress(Exception):
                    emit_json_report({**report, "partial": True}, args.out, quiet=True)
    emit_json_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
