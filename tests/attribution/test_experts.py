"""Mixture-of-experts layers held as fused 3-D parameters (issue 20, item 4): every expert's projections are
attributed as their own layers, with the routing respected; the per-sample gradients and IF scores equal a
float64 reference that loops over the experts as separate nn.Linear layers (Mixtral's layout; gpt-oss's:
transposed, biased, interleaved gate; Qwen2-MoE's, with a shared expert called on the flattened tokens); every
expert parameter is covered and the CLI reports the fraction; a layout that is not recognised is named and
refused."""
import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from cli_runs import fresh_process, single, torchrun  # noqa: E402

from attribution import Attributor  # noqa: E402
from attribution.experts import ExpertProjection, is_fused_experts  # noqa: E402
from attribution.integrations import causal_lm_loss  # noqa: E402
from attribution.layers import coverage, find_layers  # noqa: E402

VOCAB = 64


def _moe(kind: str, dtype=torch.float64):
    """A tiny random MoE causal LM from a transformers config: 2 blocks of 4 experts, top-2 routing."""
    from transformers import (
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    if kind == "mixtral":
        config, cls = MixtralConfig(**common), MixtralForCausalLM
    elif kind == "qwen2_moe":  # a shared expert and its gate beside the routed experts, on the flattened tokens
        common = {k: v for k, v in common.items() if k != "num_local_experts"}
        config = Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=12)
        cls = Qwen2MoeForCausalLM
    else:
        config, cls = GptOssConfig(**common, head_dim=8, layer_types=["full_attention"] * 2), GptOssForCausalLM
    config._experts_implementation = "eager"  # the reference forward in any dtype (grouped_mm: no float64)
    model = cls(config).to(dtype).eval()
    for name, p in model.named_parameters():  # biases and sinks start at zero: make every term count
        if p.dim() < 3 and ("bias" in name or "sinks" in name):
            nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


class LoopExperts(nn.Module):
    """The reference: each expert's projections as separate nn.Linear layers, called on its routed tokens only."""

    def __init__(self, fused):
        super().__init__()
        self.fused = [fused]
        first = fused.gate_up_proj if fused.has_gate else fused.up_proj

        def linears(weights, biases):
            out = nn.ModuleList()
            for e in range(weights.shape[0]):
                w = weights[e].T if fused.is_transposed else weights[e]
                layer = nn.Linear(w.shape[1], w.shape[0], bias=biases is not None, dtype=w.dtype)
                layer.weight.data.copy_(w)
                if biases is not None:
                    layer.bias.data.copy_(biases[e])
                out.append(layer)
            return out

        self.first = linears(first.data, getattr(fused, "gate_up_proj_bias", None) if fused.has_bias else None)
        self.second = linears(fused.down_proj.data, fused.down_proj_bias if fused.has_bias else None)

    def forward(self, hidden, top_k_index, top_k_weights):
        fused, out = self.fused[0], torch.zeros_like(hidden)
        for e in range(len(self.first)):
            token, slot = torch.where(top_k_index == e)
            h = self.first[e](hidden[token])
            h = fused._apply_gate(h) if fused.has_gate else fused.act_fn(h)
            out = out.index_add(0, token, self.second[e](h) * top_k_weights[token, slot, None].to(h.dtype))
        return out


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (5, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    train = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    query = {"input_ids": ids[:2, :5], "attention_mask": torch.ones(2, 5, dtype=torch.long), "labels": ids[:2, :5]}
    return train, query


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_per_expert_gradients_and_scores_equal_experts_as_separate_linear_layers(kind):
    model = _moe(kind)
    reference = copy.deepcopy(model)
    for block in reference.model.layers:
        block.mlp.experts = LoopExperts(block.mlp.experts)
    train, query = _batches()
    attr = Attributor(model, causal_lm_loss, compressor="identity", k=8, compile=False, progress=False,
                      dtype=torch.float64, damping=0.1, layers=["model.layers.*"])
    experts = [n for n in attr.layer_names if ".per_expert." in n]
    assert len(experts) == 2 * 4 * 2  # blocks x experts x (gate_up, down)
    assert (kind == "qwen2_moe") == any(".shared_expert" in n for n in attr.layer_names)
    names = dict(reference.named_modules())
    modules = [names[n.replace("per_expert.gate_up_proj", "first").replace("per_expert.up_proj", "first")
                     .replace("per_expert.down_proj", "second")] for n in attr.layer_names]

    def dense(batch):  # one sample at a time through the reference: every block's W.grad in (d_in, d_out) order
        rows = [[] for _ in modules]
        for i in range(batch["input_ids"].shape[0]):
            reference.zero_grad()
            causal_lm_loss(reference, {key: value[i : i + 1] for key, value in batch.items()}).sum().backward()
            for j, m in enumerate(modules):
                grad = m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight)
                rows[j].append(grad.T.flatten().clone())
        return [torch.stack(r) for r in rows]

    g_train, g_query = dense(train), dense(query)
    torch.testing.assert_close(attr.compress_batch(train)[0], torch.cat(g_train, 1), rtol=1e-9, atol=1e-12)
    unrouted = [n for n, g in zip(attr.layer_names, g_train) if ".per_expert." in n and not g.any()]
    assert len(unrouted) < len(experts)  # the batch reaches most experts: the routing is exercised
    want = torch.zeros(2, 5, dtype=torch.float64)
    for g, q in zip(g_train, g_query):
        fim = g.T @ g / g.shape[0] + 0.1 * torch.eye(g.shape[1], dtype=torch.float64)
        want += q @ torch.linalg.solve(fim, g.T)
    torch.testing.assert_close(attr.cache([train]).attribute([query]), want, rtol=1e-8, atol=1e-10)
    # outside a capture the fused module runs its own forward again
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__


def test_every_expert_parameter_is_covered():
    model = _moe("mixtral", torch.float32)
    blocks = find_layers(model)
    fused = [m for m in model.modules() if is_fused_experts(m)]
    views = {n: i for n, i in blocks.items() if i.kind == "expert"}
    assert sum(i.params for i in views.values()) == sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in fused)
    covered = coverage(model, blocks)
    routers = sum(m.gate.weight.numel() for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts"))
    embedding = model.model.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert covered["total"] - covered["attributed"] == routers + embedding + norms  # lm_head: a covered linear layer
    assert all(isinstance(dict(model.named_modules())[n], ExpertProjection) for n in views)


def test_a_layout_that_is_not_recognised_is_named_and_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.Parameter(torch.zeros(4, 8, 8))
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x) + torch.einsum("btd,edf->btf", x, self.experts)

    class DbrxLikeExperts(nn.Module):  # experts concatenated in 2-D: named like experts, not recognised
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.zeros(4 * 8, 8))

    class Positions(nn.Module):  # a [1, T, d] position embedding: not a stack of matrices
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
            self.proj = nn.Linear(8, 8)

    model = nn.Sequential(Odd())
    with pytest.raises(ValueError, match=r"does not recognise .*0 \(Odd\): experts"):
        find_layers(model)
    assert list(find_layers(model, ["0.proj"])) == ["0.proj"]  # named layers leave it out knowingly
    with pytest.raises(ValueError, match=r"0 \(DbrxLikeExperts\): w1"):
        find_layers(nn.Sequential(DbrxLikeExperts(), nn.Linear(8, 8)))
    assert list(find_layers(nn.Sequential(Positions()))) == ["0.proj"]
    with pytest.raises(ValueError, match="does not support the experts"):
        Attributor(_moe("mixtral", torch.float32), causal_lm_loss, preconditioner="kfac", compile=False, progress=False)


def test_grass_attribute_caches_a_moe_model_reports_its_coverage_and_two_ranks_agree(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "moe"
    model = _moe("mixtral", torch.float32)
    model.config._experts_implementation = None  # saved with the default implementation
    model.save_pretrained(folder)
    words = [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>").save_pretrained(folder)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": " ".join(words[i : i + 5])}) for i in range(0, 35, 5)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "w1 w2", "completion": " w3 w4"}) + "\n")
    flags = ["--model", str(folder), "--corpus", str(corpus), "--k", "16", "--batch-size", "2", "--no-compile",
             "--autocast", "none"]
    done = fresh_process("cache", "--store", str(tmp_path / "one"), *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    blocks = find_layers(model, ["model.layers.*"])
    assert summary["parameters_covered"] == pytest.approx(coverage(model, blocks)["fraction"])
    assert summary["layers"] == len(blocks) and sum(".per_expert." in n for n in blocks) == 16
    torchrun("cache", "--store", str(tmp_path / "two"), *flags)
    for store, run in (("one", single), ("two", torchrun)):
        run("attribute", "--store", str(tmp_path / store), "--prompts", str(prompts), "--top-k", "3",
            "--out", str(tmp_path / f"report_{store}"))
    one, two = (json.loads((tmp_path / f"report_{s}" / "report.json").read_text())["queries"] for s in ("one", "two"))
    for a, b in zip(one, two):
        assert [d["id"] for d in a["helpful"]] == [d["id"] for d in b["helpful"]]
        assert [d["score"] for d in a["helpful"]] == pytest.approx([d["score"] for d in b["helpful"]], rel=1e-3, abs=1e-4)
