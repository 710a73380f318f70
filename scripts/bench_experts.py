#!/usr/bin/env python
"""What per-expert attribution costs (issue 20, item 4): the compressed per-sample gradients of a random Mixtral
(8 experts, top-2, computed through the expert views, attribution.experts) against its own forward + backward on
the same batch, beside the same two figures for a dense Llama with the same active parameters per token
(intermediate = 2 experts' worth). Both with the default compressor (factgrass:blowup=4, k=256, every linear layer
and expert of the blocks), float32, eager, in turns (A B A B); median seconds per batch. Prints JSON.

    python scripts/bench_experts.py          # hidden 512, 4 blocks, batches of 4 x 256 tokens
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from grass_ops.benchmarking import emit_json_report  # noqa: E402


def models(hidden: int, layers: int, experts: int, intermediate: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts,
                                           num_experts_per_tok=2)).eval()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=2 * intermediate)).eval()
    return {"mixtral": moe, "dense": dense}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (the shape pass, allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from attribution import Attributor
    from attribution.integrations import causal_lm_loss
    from attribution.layers import coverage

    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = {"config": vars(args), "threads": torch.get_num_threads()}
    built = models(args.hidden, args.layers, args.experts, args.intermediate, args.vocab)
    attributors = {name: Attributor(m, causal_lm_loss, compressor="factgrass:blowup=4", k=256, layers=["model.layers.*"],
                                    compile=False, progress=False) for name, m in built.items()}

    def backward(model):
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, batch).sum().backward()

    results = {name: {"compress": [], "forward_backward": []} for name in built}
    for _ in range(2):  # A B A B
        for name, model in built.items():
            results[name]["compress"].append(timed(lambda: attributors[name].compress_batch(batch), args.repeats))
            results[name]["forward_backward"].append(timed(lambda: backward(model), args.repeats))
    for name, model in built.items():
        r = {key: statistics.median(v) for key, v in results[name].items()}
        r["compress_over_forward_backward"] = r["compress"] / r["forward_backward"]
        r["blocks"] = len(attributors[name].layer_names)
        r["parameters"] = sum(p.numel() for p in model.parameters())
        r["coverage"] = coverage(model, attributors[name].layer_infos)["fraction"]
        out[name] = r
    out["mixtral_ratio_over_dense_ratio"] = (out["mixtral"]["compress_over_forward_backward"]
                                             / out["dense"]["compress_over_forward_backward"])
    emit_json_report(out)
    return out


if __name__ == "__main__":
    main()
