"""Throughput of the LLM cache stage (the shape of the paper's Table 2), used by ``grass-attribute bench``
(attribution.llm.commands.bench); ``job`` runs ``cache`` through the command's own API, not the CLI.

Per model and k per layer: tokens/s of (a) a forward + activation-gradient-only backward (the floor of
any per-sample gradient method), (b) the compression alone on every layer's factors, (c) the whole
cache step (in-backward compression), for FactGraSS and LoGra; on a GPU, peak memory of (a) and (c).
Models: "smollm2" (embedded, real weights), "gpt2-random" (GPT-2 small from its config, random weights, Conv1D layers) and, on a GPU,
"llama3-8b-random" (Llama-3.1-8B from its config, random bf16 weights, no download).
"""
from __future__ import annotations

import platform

import torch

from grass_ops.benchmarking import median_seconds

from .. import llm
from ..attributor import Attributor
from ..capture import frozen_parameters, probe_gradients
from ..compression import compress_layer
from ..store.manifest import model_fingerprint

Tensor = torch.Tensor


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


_BIG_STATE_BYTES = 1 << 30  # above this, the host-side hashes are timed once (seconds a pass: BENCHMARKS.md)


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


def activation_backward(model, loss_fn, batch) -> Tensor:
    """The floor of any per-sample gradient method: a forward pass and a backward pass of activation
    gradients only (no weight gradient, nothing captured), taken w.r.t. a zero probe added to the input
    embeddings. Returns the probe's gradient [B, T, hidden]."""
    embeddings = model.get_input_embeddings()
    ids = batch["input_ids"]
    dtype = embeddings.weight.dtype

    def summed(probe):
        handle = embeddings.register_forward_hook(lambda module, args, out: out + probe)
        try:
            return loss_fn(model, batch).sum(), None
        finally:
            handle.remove()

    probe = torch.zeros(*ids.shape, embeddings.embedding_dim, dtype=dtype, device=ids.device)
    with frozen_parameters(model):  # as the pipeline's eager step
        return probe_gradients(summed, probe)[0]  # the pipeline's own gradient routine (eager: torch.autograd.grad)


def compress_seconds(compressors: dict, infos: dict, rows: int, tokens: int, dtype, device, repeats: int) -> float:
    """Seconds to compress one batch's factors of every layer after the backward (the paper's Table 2
    "compress"): random factors [rows, tokens, d] of each distinct layer shape, timed once per shape and
    counted once per layer of that shape (the factors of every layer never need to coexist)."""
    by_shape: dict[tuple, list[str]] = {}
    for name, info in infos.items():
        by_shape.setdefault((info.d_in, info.d_out), []).append(name)
    total = 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    for (d_in, d_out), names in by_shape.items():
        x = torch.randn(rows, tokens, d_in, generator=gen, device=device).to(dtype)
        g = torch.randn(rows, tokens, d_out, generator=gen, device=device).to(dtype)
        comp = compressors[names[0]]
        total += len(names) * median_seconds(lambda x=x, g=g: compress_layer(comp, x, g), repeats, device=device)
        del x, g
    return total


def _peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def run(models=("smollm2", "gpt2-random"), ks=(256, 1024, 4096), batch_size=2, seq_len=128, repeats=3,
        device="cpu", dtype="float32", on_progress=None, fingerprint: bool = True) -> dict:
    """The throughput table: per model, the activation-gradient floor (:func:`activation_backward`), and per
    compressor and k the cache step (in-backward compression, what ``Attributor.cache`` runs per batch)
    and the compression alone (:func:`compress_seconds`); tokens/s and, on a GPU, peak memory.
    ``on_progress(report)``, when given, is called with the partial report after the model is built and
    after every row, so that a run stopped by a time limit keeps what it measured."""
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
        rows["parameters"] = sum(p.numel() for p in model.parameters())
        progress(f"{name}: built")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
        tokens = batch_size * seq_len
        layers = ["model.layers.*"] if name != "gpt2-random" else ["transformer.h.*"]
        if fingerprint:
            rows["fingerprint"] = fingerprint_seconds(model)
            progress(f"{name}: fingerprint timed")
        _reset_peak(device)
        bare_s = median_seconds(lambda m=model: activation_backward(m, llm.sequence_loss, batch), repeats, warmup=2,
                                device=device)
        rows["activation_backward"] = {"tokens_per_s": tokens / bare_s, "peak_bytes": _peak_bytes(device)}
        progress(f"{name}: activation backward")
        for k in ks:
            for comp in ("factgrass", "logra"):
                attr = Attributor(model, llm.sequence_loss, compressor=comp, k=k, compile=False, progress=False,
                                  layers=layers)
                _reset_peak(device)
                cache_s = median_seconds(lambda a=attr: a.compress_batch(batch), repeats, device=device)
                peak = _peak_bytes(device)
                compress_s = compress_seconds(attr.compressors, attr.layer_infos, batch_size, seq_len,
                                              llm.DTYPES[dtype], device, repeats)
                itemsize = torch.finfo(llm.DTYPES[dtype]).bits // 8
                factor_bytes = sum((i.d_in + i.d_out) * seq_len * itemsize for i in attr.layer_infos.values())
                rows[f"{comp}_k{k}"] = {
                    "layers": len(attr.layer_names), "cache_tokens_per_s": tokens / cache_s,
                    "compress_tokens_per_s": tokens / compress_s, "cache_vs_activation_backward": bare_s / cache_s,
                    "peak_bytes": peak,
                    "per_sample_bytes": {"factors_never_held": factor_bytes, "compressed": 4 * sum(attr.dims),
                                         "weight_gradients_never_formed": sum(i.params for i in attr.layer_infos.values()) * 4}}
                del attr
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
    import sys
    import tempfile

    from grass_ops.benchmarking import run_measured

    with tempfile.TemporaryDirectory(prefix="grass_job_") as tmp:
        run = run_measured([sys.executable, "-m", "attribution.llm.bench", "--job-child", tmp, "--limit", str(documents), *flags])
        if run["status"] != 0:
            raise RuntimeError(f"the job failed (status {run['status']}): {run['stdout'][-1000:]} {run['stderr_tail'][-1000:]}")
    result = json.loads(run["stdout"].strip().splitlines()[-1])
    result["peak_rss_gb"] = run["peak_rss_bytes"] / 2**30
    return result


def _job_child(store: str, flags: list[str]) -> None:
    import json
    from pathlib import Path

    from .commands import cache, common
    from .config import CacheConfig

    args = cache.COMMAND.parse(["--store", f"{store}/store", *flags])
    model, tokenizer = common.load_model(CacheConfig.from_args(args))  # with its --adapter
    summary = cache.run(args, (model, tokenizer))
    sizes = {"shards": 0, "fim": 0, "masks": 0}
    for path in Path(store).rglob("*"):
        if path.is_file():
            kind = "shards" if "/shards/" in str(path) else "fim" if "/fim/" in str(path) else "masks" if "/masks/" in str(path) else None
            if kind:
                sizes[kind] += path.stat().st_size
    config = CacheConfig.from_args(args)
    docs = llm.load_documents(config, tokenizer)
    batches, _ = llm.document_batches(tokenizer, docs, config.batch_size, config.max_length, config.token_batch_size)
    import time

    start = time.perf_counter()
    for batch in batches:
        activation_backward(model, llm.sequence_loss, batch)
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
