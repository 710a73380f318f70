"""Throughput of the LLM cache stage (the shape of the paper's Table 2), used by ``grass-attribute bench``.

Per model and k per layer: tokens/s of (a) a bare forward + activation-gradient-only backward (the
per-sample factors, no compression), (b) the compress step alone on those factors, (c) the whole
cache step (a + b), for FactGraSS and LoGra. Models: "smollm2" (embedded, real weights),
"gpt2-random" (GPT-2 small from its config, random weights, Conv1D layers) and, on a GPU,
"llama3-8b-random" (Llama-3.1-8B from its config, random bf16 weights, no download).
"""
from __future__ import annotations

import platform

import torch

from grass_ops.benchmarking import median_seconds

from . import llm
from .attributor import Attributor
from .compress import compress_layer
from .manifest import model_fingerprint


def build_model(name: str, device: str, dtype: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "smollm2":
        model, _ = llm.load_model("smollm2", dtype=dtype, device=device)
        return model, model.config.vocab_size
    if name == "gpt2-random":
        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
        return GPT2LMHeadModel(config).to(device, llm.DTYPES[dtype]).eval(), config.vocab_size
    if name == "llama3-8b-random":
        if device == "cpu":
            raise ValueError("llama3-8b-random needs a GPU (about 16 GB of bf16 weights)")
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(llm.DTYPES[dtype]).eval()
        return model, config.vocab_size
    raise ValueError(f"unknown bench model {name!r}")


_BIG_STATE_BYTES = 1 << 30  # above this, the host-side hashes are timed once (16 GB at ~1.5 GB/s is ~10 s a pass)


def fingerprint_seconds(model) -> dict:
    """Time to fingerprint the model's weights: both algorithms, and the copy-then-hash one they replace.
    The host-side hashes (sha256, copy-then-sha256) of a state above 1 GiB run once, without warm-up."""
    import hashlib

    state = model.state_dict()
    out = {"bytes": sum(t.numel() * t.element_size() for t in state.values())}
    big = out["bytes"] > _BIG_STATE_BYTES
    host_runs = dict(repeats=1, warmup=0) if big else dict(repeats=3, warmup=1)
    out["host_hash_runs"] = host_runs["repeats"]
    for algorithm in ("sha256", "lin64"):
        runs = host_runs if algorithm == "sha256" else dict(repeats=3, warmup=1)
        out[f"{algorithm}_s"] = median_seconds(lambda a=algorithm: model_fingerprint(state, a), **runs)

    def copy_then_hash():  # what an Attributor did before: host copy + bytes copy of every tensor, then sha256
        h = hashlib.sha256()
        for name in sorted(state):
            h.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    out["copy_then_sha256_s"] = median_seconds(copy_then_hash, **host_runs)
    return out


def run(models=("smollm2", "gpt2-random"), ks=(256, 1024, 4096), batch_size=2, seq_len=128, repeats=3,
        device="cpu", dtype="float32", on_progress=None) -> dict:
    """The throughput table. ``on_progress(report)``, when given, is called with the partial report after
    the model is built and after every row, so that a run stopped by a time limit keeps what it measured."""
    import sys
    import time

    started = time.perf_counter()

    def progress(what: str):
        print(f"[bench {time.perf_counter() - started:7.1f} s] {what}", file=sys.stderr, flush=True)
        if on_progress is not None:
            on_progress(report)

    report = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": batch_size,
              "seq_len": seq_len, "dtype": dtype, "models": {}}
    for name in models:
        rows = report["models"][name] = {}
        model, vocab = build_model(name, device, dtype)
        progress(f"{name}: built")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
        tokens = batch_size * seq_len
        layers = ["model.layers.*"] if name != "gpt2-random" else ["transformer.h.*"]
        rows["fingerprint"] = fingerprint_seconds(model)
        progress(f"{name}: fingerprint timed")
        bare_s = None
        for k in ks:
            for comp in ("factgrass", "logra"):
                attr = Attributor(model, llm.sequence_loss, compressor=comp, k=k, compile=False, progress=False,
                                  layers=layers)
                capture = attr.compress.capture
                probes = attr.compress.probes(llm.sequence_loss, batch)
                factors = {}

                def bare():  # the per-sample factors alone: forward + activation-gradient backward
                    with capture.hooks():
                        inputs, grads, _ = capture.factors(llm.sequence_loss, batch, probes)
                    factors.update({n: (inputs[n], grads[n]) for n in attr.layer_names})

                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                if bare_s is None:  # the same for every compressor: measured once per model, well warmed up
                    bare_s = median_seconds(bare, repeats, warmup=3, device=device)
                else:
                    bare()

                def compress():
                    for n in attr.layer_names:
                        compress_layer(attr.compressors[n], *factors[n])

                compress_s = median_seconds(compress, repeats, device=device)
                cache_s = median_seconds(lambda: attr.compress_batch(batch), repeats, device=device)
                factor_bytes = sum(x.element_size() * (x.numel() + g.numel()) for x, g in factors.values()) / batch_size
                weight_grad_bytes = sum(i.params for i in attr.layer_infos.values()) * 4
                row = {"layers": len(attr.layer_names), "bare_tokens_per_s": tokens / bare_s,
                       "compress_tokens_per_s": tokens / compress_s, "cache_tokens_per_s": tokens / cache_s,
                       "cache_vs_bare": bare_s / cache_s,
                       "per_sample_bytes": {"factors": factor_bytes, "compressed": 4 * sum(attr.dims),
                                            "weight_gradients_never_formed": weight_grad_bytes}}
                if device.startswith("cuda"):
                    row["peak_gpu_bytes_per_sample"] = torch.cuda.max_memory_allocated() / batch_size
                rows[f"{comp}_k{k}"] = row
                attr.close()
                progress(f"{name}: {comp} k={k}")
        for k in ks:
            rows[f"compress_speedup_factgrass_vs_logra_k{k}"] = (
                rows[f"factgrass_k{k}"]["compress_tokens_per_s"] / rows[f"logra_k{k}"]["compress_tokens_per_s"])
        del model
    return report


def job(flags: list[str] = (), documents: int = 96) -> dict:
    """The main job's cache stage (``grass-attribute cache`` on ``documents`` Python-docs paragraphs with
    the default configuration plus ``flags``), measured in a fresh process: real tokens per second of
    the gradient phase (compile time excluded, and included), the process's peak RSS, the store's size
    without and with the FIM, and a bare forward + activation-gradient backward on the same batches."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="grass_job_") as tmp:
        cmd = [sys.executable, "-m", "attribution.llm_bench", "--job-child", tmp, "--limit", str(documents), *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise RuntimeError(f"the job failed (status {status}): {output[-2000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20
    return result


def _job_child(store: str, flags: list[str]) -> None:
    import json
    from pathlib import Path

    from . import cli
    from .capture import FactorCapture
    from .layers import find_layers

    args = cli.build_parser().parse_args(["cache", "--store", f"{store}/store", *flags])
    model, tokenizer = llm.load_model(args.model, args.gguf_file, args.dtype)
    summary = cli.cmd_cache(args, (model, tokenizer))
    sizes = {"shards": 0, "fim": 0, "masks": 0}
    for path in Path(store).rglob("*"):
        if path.is_file():
            kind = "shards" if "/shards/" in str(path) else "fim" if "/fim/" in str(path) else "masks" if "/masks/" in str(path) else None
            if kind:
                sizes[kind] += path.stat().st_size
    config = {k: getattr(args, k) for k in ("batch_size", "max_length", "token_batch_size")}
    docs = cli._docs({**{k: getattr(args, k) for k in cli.CACHE_KEYS}}, tokenizer)
    batches, _ = llm.document_batches(tokenizer, docs, config["batch_size"], config["max_length"], config["token_batch_size"])
    capture = FactorCapture(model, find_layers(model, cli._layers(model, args.layers)))
    import time

    start = time.perf_counter()
    for batch in batches:
        capture.capture(llm.sequence_loss, batch)
    bare = time.perf_counter() - start
    steady = summary["gradient_seconds"] - summary["compile_seconds"]
    print(json.dumps({**summary, "flags": flags, "store_bytes": sizes, "bare_seconds": bare,
                      "gradient_tokens_per_s": summary["real_tokens"] / steady,
                      "gradient_tokens_per_s_with_compile": summary["real_tokens"] / summary["gradient_seconds"],
                      "bare_tokens_per_s": summary["real_tokens"] / bare, "cache_vs_bare": bare / steady,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--job-child":
        _job_child(sys.argv[2], sys.argv[3:])
