"""The LLM fidelity harness: its exact truth equals dense per-document gradients, and an exact
method scores a perfect Spearman against it."""
import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from attribution import llm  # noqa: E402
from attribution.evaluation.fidelity import Method, fidelity, measure, scores  # noqa: E402
from attribution.layers import find_layers  # noqa: E402
from attribution.selective_mask import energy_masks  # noqa: E402

TEXTS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
         "python list data", "the function creates a list", "data for the loop"]


def test_truth_is_the_exact_gradient_and_exact_methods_agree(tiny_llama, tmp_path):
    model, tok = llm.load_model(tiny_llama)
    model = model.double()
    docs = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    queries = [{"id": "q0", "prompt": "a for", "completion": " loop list"}, {"id": "q1", "prompt": "the", "completion": " data"}]
    doc_batches, order = llm.document_batches(tok, docs, 3, 8)
    query_batches = llm.query_batches(tok, queries, None, 8)
    layers = find_layers(model, ["model.layers.*"])
    mask_dir = tmp_path / "masks"
    energy_masks(model, llm.sequence_loss, doc_batches, mask_dir, k=16, layers=["model.layers.*"])
    methods = {"identity": Method("identity", 10**6, "inner"), "identity-cos": Method("identity", 10**6, "cosine"),
               "energy": Method(f"factgrass:mask_dir={mask_dir}", 16), "if": Method("sjlt", 16, "if")}
    truth, features = measure(model, llm.sequence_loss, layers, doc_batches, query_batches, methods, progress=False)
    mods = [m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]

    def dense(batches, rows):
        out = []
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                model.zero_grad()
                llm.sequence_loss(model, {k: v[i : i + 1] for k, v in b.items()}).sum().backward()
                out.append(torch.cat([m.weight.grad.flatten() for m in mods]))
        return torch.stack(out)

    g, q = dense(doc_batches, None), dense(query_batches, None)
    torch.testing.assert_close(truth.inner, q @ g.T, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(truth.cosine, (q @ g.T) / (q.norm(dim=1)[:, None] * g.norm(dim=1)[None, :]), rtol=1e-5,
                               atol=1e-8)
    exact = fidelity(truth, scores(features["identity"], methods["identity"]))
    assert exact["spearman_vs_inner"] == pytest.approx(1.0) and fidelity(
        truth, scores(features["identity-cos"], methods["identity-cos"]))["spearman_vs_cosine"] == pytest.approx(1.0)
    for name in ("energy", "if"):
        result = fidelity(truth, scores(features[name], methods[name]))
        assert -1 <= result["spearman_vs_cosine"] <= 1 and len(result["per_query_vs_cosine"]) == 2


def test_energy_masks_rank_the_scaled_coordinates(tiny_llama, tmp_path):
    """scales= (the optimizer normalization's factors, applied before the masks): the masks keep the coordinates
    of largest moment * scale**2, so a high-energy coordinate scaled to ~0 is dropped and a scaled-up one kept."""
    model, tok = llm.load_model(tiny_llama)
    docs = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    batches, _ = llm.document_batches(tok, docs, 4, 8)
    name = "model.layers.0.mlp.down_proj"
    plain = energy_masks(model, llm.sequence_loss, batches, tmp_path / "plain", k=4, layers=[name], blowup=1.0)
    x_kept, g_kept = plain[name]
    info = find_layers(model, [name])[name]
    x_scale, g_scale = torch.ones(info.d_in), torch.ones(info.d_out)
    x_scale[x_kept[0]], g_scale[g_kept[0]] = 1e-6, 1e-6  # a kept coordinate scaled to nothing
    x_up = next(i for i in range(info.d_in) if i not in set(x_kept.tolist()))
    x_scale[x_up] = 1e6  # an unkept one scaled up
    scaled = energy_masks(model, llm.sequence_loss, batches, tmp_path / "scaled", k=4, layers=[name], blowup=1.0,
                          scales={name: (x_scale, g_scale)})
    x_new, g_new = scaled[name]
    assert int(x_kept[0]) not in x_new.tolist() and x_up in x_new.tolist()
    assert int(g_kept[0]) not in g_new.tolist() and len(x_new) == len(x_kept)


def test_energy_masks_run_their_forward_under_the_given_autocast(tiny_llama, tmp_path):
    """autocast=: every forward of the mask pass runs under torch.autocast to that dtype (as the cache's own pass);
    without it, none does. Other dtypes are refused, naming the argument."""
    model, tok = llm.load_model(tiny_llama)
    batches, _ = llm.document_batches(tok, [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)], 4, 8)
    seen = []

    def loss_fn(model, batch):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return llm.sequence_loss(model, batch)

    name = "model.layers.0.mlp.down_proj"
    mixed = energy_masks(model, loss_fn, batches, tmp_path / "mixed", k=4, layers=[name], autocast=torch.bfloat16)
    assert seen == [torch.bfloat16] * len(batches)
    seen.clear()
    plain = energy_masks(model, loss_fn, batches, tmp_path / "plain", k=4, layers=[name])
    assert seen == [None] * len(batches)
    assert [len(t) for t in mixed[name]] == [len(t) for t in plain[name]]
    with pytest.raises(ValueError, match="autocast must be torch.bfloat16, torch.float16 or None"):
        energy_masks(model, loss_fn, batches, tmp_path / "bad", k=4, layers=[name], autocast=torch.float64)


def test_features_alone_equal_the_truth_pass_and_scorings_share_a_compressor(tiny_llama):
    """truth=False compresses each query batch as it comes (its factors dropped): the same features as the
    truth pass, which stacks every query's factors; methods differing only in scoring share one compressor."""
    model, tok = llm.load_model(tiny_llama)
    docs = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    queries = [{"id": "q0", "prompt": "a for", "completion": " loop list"}, {"id": "q1", "prompt": "the", "completion": " data"},
               {"id": "q2", "prompt": "lambda", "completion": " expression creates"}]
    doc_batches, _ = llm.document_batches(tok, docs, 3, 8)
    query_batches = llm.query_batches(tok, queries, 2, 8)  # two batches of queries, the second of 1 (odd-sized)
    layers = find_layers(model, ["model.layers.*"])
    methods = {"cos": Method("sjlt", 16, "cosine"), "if": Method("sjlt", 16, "if"), "fg": Method("factgrass", 16)}
    _, with_truth = measure(model, llm.sequence_loss, layers, doc_batches, query_batches, methods, progress=False)
    _, alone = measure(model, llm.sequence_loss, layers, doc_batches, query_batches, methods, progress=False, truth=False)
    for name in methods:
        assert alone[name].queries.shape[0] == len(queries)
        torch.testing.assert_close(alone[name].queries, with_truth[name].queries, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alone[name].docs, with_truth[name].docs)
    assert alone["cos"] is alone["if"] and alone["fg"] is not alone["if"]
    assert not torch.equal(alone["fg"].docs, alone["if"].docs)


@pytest.mark.parametrize("case", ["float64", "bfloat16 autocast"])
def test_features_formed_in_the_backward_equal_the_factors_path_in_float64_and_under_autocast(tiny_llama, case):
    """truth=False forms the features inside the backward, one layer at a time: in a float64 model they stay float64,
    and under bfloat16 autocast they equal the factors' path (factors upcast to float32), query and document
    batches of odd sizes (the last of one)."""
    model, tok = llm.load_model(tiny_llama)
    model = model.double() if case == "float64" else model
    autocast = torch.bfloat16 if case != "float64" else None
    docs = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    queries = [{"id": "q0", "prompt": "a for", "completion": " loop list"}, {"id": "q1", "prompt": "the", "completion": " data"},
               {"id": "q2", "prompt": "lambda", "completion": " expression creates"}]
    doc_batches, _ = llm.document_batches(tok, docs, 2, 8)  # 7 documents: batches of 2, 2, 2 and 1
    query_batches = llm.query_batches(tok, queries, 2, 8)
    layers = find_layers(model, ["model.layers.*"])
    methods = {"fg": Method("factgrass", 16), "sjlt": Method("sjlt", 16, "if"), "logra": Method("logra", 16)}
    _, factors = measure(model, llm.sequence_loss, layers, doc_batches, query_batches, methods, progress=False,
                         autocast=autocast)
    _, in_backward = measure(model, llm.sequence_loss, layers, doc_batches, query_batches, methods, progress=False,
                             truth=False, autocast=autocast)
    for name in methods:
        want, got = factors[name], in_backward[name]
        assert got.docs.dtype == want.docs.dtype == (torch.float64 if case == "float64" else torch.float32)
        assert got.docs.shape == (len(docs), want.docs.shape[1]) and got.queries.shape[0] == len(queries)
        torch.testing.assert_close(got.docs, want.docs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.queries, want.queries, rtol=1e-5, atol=1e-6)
        assert got.widths == want.widths and got.docs.abs().sum() > 0
