"""LoRA / PEFT adapters (issue 20, item 2): a peft model attributes over its adapters' lora_A / lora_B by default,
their per-sample gradients and scores equal a dense reference, and `grass-attribute cache --adapter` records the
adapter so that `attribute` in a fresh process reads the store back; bad adapters get clear errors."""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")
peft = pytest.importorskip("peft", reason="the `llm` extra (peft) is not installed")

from cli_runs import fresh_process, single, torchrun  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from attribution import Attributor  # noqa: E402
from attribution.layers import find_layers  # noqa: E402
from attribution.llm import (  # noqa: E402
    cli,  # noqa: E402
    document_batches,
    query_batches,
    sequence_loss,
)
from attribution.llm.commands.common import CLIError  # noqa: E402
from attribution.llm.config import CacheConfig  # noqa: E402

DOCS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
        "python list data"]  # batches of 2: the last holds one document
QUERIES = [{"prompt": "a for", "completion": " loop list"}, {"prompt": "the data", "completion": " privacy"}]


def _adapted(folder, dtype=torch.float32, targets=("q_proj", "v_proj"), **options):
    """(peft model, tokenizer): the tiny Llama with a rank-2 LoRA, both factors random (lora_B is not zero, so
    lora_A's gradient is not either)."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False, **options)
    return peft.get_peft_model(model, config).eval(), AutoTokenizer.from_pretrained(folder)


def _lora_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (".lora_A." in n or ".lora_B." in n)]


def test_the_default_layers_of_a_peft_model_are_its_adapters_and_the_base_layers_can_be_named(tiny_llama):
    model, _ = _adapted(tiny_llama)
    found = find_layers(model)
    assert list(found) == _lora_names(model) and len(found) == 8  # q and v of 2 blocks, A and B each
    assert {(i.d_in, i.d_out) for n, i in found.items() if ".lora_A." in n} == {(32, 2)}
    base = find_layers(model, "*.q_proj.base_layer")
    assert len(base) == 2 and all(i.d_in == 32 for i in base.values())


def test_adapter_scores_equal_dense_per_sample_gradients_of_the_adapter_weights(tiny_llama):
    model, tokenizer = _adapted(tiny_llama, dtype=torch.float64)
    train, _ = document_batches(tokenizer, [{"id": str(i), "text": t} for i, t in enumerate(DOCS)], 2, 8, None)
    test = query_batches(tokenizer, QUERIES, 1, 8)
    attr = Attributor(model, sequence_loss, compressor="identity", k=64, damping=0.1, compile=False, progress=False,
                      dtype=torch.float64).cache(train)
    scores = attr.attribute(test)
    lora = [m for n, m in model.named_modules() if n in set(_lora_names(model))]

    def dense(batches):  # one sample at a time, W.grad.T flattened (grass_ops' (d_in, d_out) order), per layer
        rows = [[] for _ in lora]
        for batch in batches:
            for i in range(batch["input_ids"].shape[0]):
                model.zero_grad()
                sequence_loss(model, {key: value[i : i + 1] for key, value in batch.items()}).sum().backward()
                for j, layer in enumerate(lora):
                    rows[j].append(layer.weight.grad.T.flatten().clone())
        return [torch.stack(r) for r in rows]

    g_train, g_test = dense(train), dense(test)
    assert all(g.abs().sum() > 0 for g in g_train)  # every adapter factor has a gradient to attribute
    want = torch.zeros(len(QUERIES), len(DOCS), dtype=torch.float64)
    for g, q in zip(g_train, g_test):
        fim = g.T @ g / g.shape[0] + 0.1 * torch.eye(g.shape[1], dtype=torch.float64)
        want += q @ torch.linalg.solve(fim, g.T)
    torch.testing.assert_close(scores, want, rtol=1e-7, atol=1e-9)


def test_an_adapter_without_trainable_weights_and_one_that_trains_an_embedding_are_refused(tiny_llama):
    model, _ = _adapted(tiny_llama)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="is_trainable=True") as err:
        find_layers(model)
    assert "none has a trainable weight" in str(err.value)
    embedded, _ = _adapted(tiny_llama, targets=("q_proj", "embed_tokens"))
    with pytest.raises(ValueError, match=r"lora_embedding_A.*params=\[") as err:
        find_layers(embedded)
    assert "no linear layer holds" in str(err.value)
    assert len(find_layers(embedded, "*.lora_*")) == 4  # named, the linear adapters are attributed


def test_modules_to_save_copies_are_attributed_and_a_non_lora_peft_model_is_refused(tiny_llama):
    saved, _ = _adapted(tiny_llama, modules_to_save=["lm_head"])
    found = find_layers(saved)
    extra = [n for n in found if ".lora_" not in n]
    assert len(found) == 9 and len(extra) == 1 and "lm_head" in extra[0] and "original_module" not in extra[0]
    torch.manual_seed(0)
    ia3 = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                              peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="IA3 adapters: only LoRA adapters"):
        find_layers(ia3)


def _save_adapter(tiny_llama, folder):
    model, _ = _adapted(tiny_llama)
    model.save_pretrained(folder)
    return str(folder)


def _files(tiny_llama, tmp_path):
    """(adapter folder, corpus.jsonl, prompts.jsonl) under tmp_path."""
    adapter = _save_adapter(tiny_llama, tmp_path / "adapter")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(q) for q in QUERIES))
    return adapter, corpus, prompts


def _cache_args(store, tiny_llama, adapter, corpus) -> list[str]:
    return ["cache", "--store", str(store), "--model", tiny_llama, "--adapter", adapter, "--corpus", str(corpus),
            "--k", "16", "--batch-size", "2", "--max-length", "8", "--masks", "random", "--no-compile",
            "--autocast", "none"]


def test_cli_cache_with_an_adapter_is_read_back_by_a_fresh_attribute_and_equals_the_python_api(tiny_llama, tmp_path):
    adapter, corpus, prompts = _files(tiny_llama, tmp_path)
    store, out = tmp_path / "store", tmp_path / "out"
    cache = _cache_args(store, tiny_llama, adapter, corpus)
    done = fresh_process(*cache)
    assert done.returncode == 0, done.stderr[-3000:]
    flags = json.loads((store / "cli.json").read_text())["flags"]
    assert flags["adapter"] == str((tmp_path / "adapter").resolve()) and flags["layers"] is None
    manifest_layers = json.loads((store / "manifest.json").read_text())["layers"]
    assert sorted(manifest_layers) == sorted(_lora_names(_adapted(tiny_llama)[0]))
    done = fresh_process("attribute", "--store", str(store), "--prompts", str(prompts), "--out", str(out), "--top-k", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())["queries"]
    # the same scores from the Python API on the same adapted model
    model, tokenizer = _adapted(tiny_llama)
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]
    train, order = document_batches(tokenizer, docs, 2, 8, None)
    attr = Attributor(model, sequence_loss, compressor="factgrass:blowup=4", k=16, damping=CacheConfig().damping, compile=False,
                      progress=False).cache(train)
    scores = attr.attribute(query_batches(tokenizer, QUERIES, 1, 8))
    for row, query in zip(scores, report):
        best = int(torch.argmax(row))
        assert query["helpful"][0]["id"] == docs[order[best]]["id"]
        assert query["helpful"][0]["score"] == pytest.approx(float(row[best]), rel=1e-4)
    # a second cache with another adapter is refused, naming the flag; a missing folder is a usage error
    other = _save_adapter(tiny_llama, tmp_path / "other")
    refused = fresh_process(*[other if a == adapter else a for a in cache])
    assert refused.returncode == 2 and "--adapter" in refused.stderr, refused.stderr[-2000:]
    with pytest.raises(CLIError, match="--adapter .*no adapter_config.json"):
        cli.run(["cache", "--store", str(tmp_path / "new"), *cache[3:5], "--adapter", str(tmp_path / "nowhere"),
                 *cache[7:]])
    assert not (tmp_path / "new").exists()  # refused before anything was written
    with pytest.raises(CLIError, match="--checkpoint with --adapter"):
        cli.run(["cache", "--store", str(tmp_path / "new"), *cache[3:], "--checkpoint", tiny_llama])
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CLIError, match="a IA3 adapter; only LoRA adapters"):
        cli.run(["cache", "--store", str(tmp_path / "new"), *cache[3:5], "--adapter", str(tmp_path / "ia3"),
                 *cache[7:]])
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_torchrun_cache_with_an_adapter_equals_one_process(tiny_llama, tmp_path):
    adapter, corpus, prompts = _files(tiny_llama, tmp_path)
    torchrun(*_cache_args(tmp_path / "dist", tiny_llama, adapter, corpus))
    single(*_cache_args(tmp_path / "single", tiny_llama, adapter, corpus))
    reports = []
    for store in ("dist", "single"):
        single("attribute", "--store", str(tmp_path / store), "--prompts", str(prompts), "--top-k", "2",
               "--out", str(tmp_path / f"report_{store}"))
        reports.append(json.loads((tmp_path / f"report_{store}" / "report.json").read_text())["queries"])
    assert reports[0] == reports[1]
