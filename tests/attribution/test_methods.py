"""The attribution methods against dense closed forms (identity compressor, float64)."""
import pytest
import torch
from attribution_problems import N_TEST, N_TRAIN, closed_form, dense_grads, loss_fn, make_problem, margin
from torch import nn

import grass_ops
from attribution import Attributor
from attribution.evaluation.metrics import spearman

EXACT = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False)


@pytest.mark.parametrize("method", ["if", "graddot", "gradcos"])
def test_identity_float64_equals_closed_form(method):
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, method=method, compressor="identity", k=10**6, damping=1e-2,
                      dtype=torch.float64, compile=False, progress=False)
    attr.cache(train)
    scores = attr.attribute(test)
    expected, g_train, g_test = closed_form(model, train, test, 1e-2, method)
    if method == "gradcos":
        g = torch.cat(g_train, 1)
        q = torch.cat(g_test, 1)
        expected = (q @ g.T) / (q.norm(dim=1, keepdim=True) * g.norm(dim=1))
    assert scores.shape == (N_TEST, N_TRAIN) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)


def test_changing_damping_needs_no_new_cache():
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, damping=1e-2, dtype=torch.float64,
                      compile=False, progress=False)
    attr.cache(train)
    attr.damping = 1e-1
    torch.testing.assert_close(attr.attribute(test), closed_form(model, train, test, 1e-1)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("compressor, k", [("factgrass", 128), ("sjlt", 128), ("grass", 128)])
def test_compressed_scores_correlate_with_identity(compressor, k):
    model, train, test = make_problem(torch.float32)
    exact = Attributor(model, loss_fn, compressor="identity", k=10**6, damping=1e-3, compile=False, progress=False)
    exact.cache(train)
    approx = Attributor(model, loss_fn, compressor=compressor, k=k, damping=1e-3, compile=False, progress=False)
    approx.cache(train)
    rho = spearman(approx.attribute(test), exact.attribute(test)).mean()
    assert float(rho) >= 0.9, f"{compressor}: mean Spearman {float(rho):.3f}"


@pytest.mark.parametrize("method", ["if", "graddot", "gradcos", "tracin"])
def test_top_k_and_self_influence_agree_with_the_full_matrix(method):
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, method=method, damping=1e-2, memory_budget=8 * 200 * 5, **EXACT).cache(train)
    assert attr._row_budget(N_TEST) < 16  # several blocks per shard: the streaming path is exercised
    scores = attr.attribute(test)
    for largest in (True, False):
        values, indices = attr.top_k(test, k=5, largest=largest)
        expected = torch.sort(scores, dim=1, descending=largest, stable=True)
        torch.testing.assert_close(values, expected.values[:, :5])
        assert torch.equal(indices, expected.indices[:, :5])
    assert attr.top_k(test, k=10**6)[0].shape == (N_TEST, N_TRAIN)
    diag = torch.diagonal(attr.attribute(train))
    torch.testing.assert_close(attr.self_influence(), diag, rtol=1e-8, atol=1e-8)


def test_top_k_breaks_ties_by_the_lower_index():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    train = [(torch.cat([x, x, x]), torch.cat([y, y, y]))]  # every document three times
    attr = Attributor(model, loss_fn, method="graddot", layers=["0"], memory_budget=8 * 40, **EXACT).cache(train)
    values, indices = attr.top_k([(x[:1], y[:1])], k=2)
    assert indices.tolist() == [[0, 4]] and values[0, 0] == values[0, 1]


def test_tracin_is_a_weighted_sum_of_checkpoint_graddots():
    model, train, test = make_problem()
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    states.append({k: v.clone() for k, v in model.state_dict().items()})
    kwargs = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False)
    tracin = Attributor(model, loss_fn, method="tracin", checkpoints=states, checkpoint_weights=[0.1, 0.3], **kwargs)
    scores = tracin.cache(train).attribute(test)
    expected = 0
    for state, lr in zip(states, [0.1, 0.3]):
        model.load_state_dict(state)
        expected = expected + lr * Attributor(model, loss_fn, method="graddot", **kwargs).cache(train).attribute(test)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("method", ["if", "graddot", "gradcos"])
def test_checkpoint_weights_weigh_every_method_not_only_tracin(method):
    """Σ_c w_c · score_c at each checkpoint, for every method that sums over checkpoints (they were once applied by
    TracIn only, so a weight given with method="if" was silently ignored); TRAK's ensemble refuses them."""
    model, train, test = make_problem()
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    states.append({k: v.clone() for k, v in model.state_dict().items()})
    kwargs = dict(method=method, compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False)
    weighted = Attributor(model, loss_fn, checkpoints=states, checkpoint_weights=[0.25, 3.0], **kwargs).cache(train)
    each = [Attributor(model, loss_fn, checkpoints=states, checkpoint_weights=w, **kwargs).cache(train).attribute(test)
            for w in ([1.0, 0.0], [0.0, 1.0])]
    torch.testing.assert_close(weighted.attribute(test), 0.25 * each[0] + 3.0 * each[1])
    values, indices = weighted.top_k(test, k=3)
    torch.testing.assert_close(values, (0.25 * each[0] + 3.0 * each[1]).topk(3, dim=1).values)
    with pytest.raises(ValueError, match="checkpoint_weights: TRAK averages its checkpoints"):
        Attributor(model, loss_fn, method="trak", checkpoints=states, checkpoint_weights=[1.0, 2.0],
                   output_fn=lambda m, b: m(b[0]).sum(1), compressor="identity", k=10**6, compile=False)


@pytest.mark.parametrize("n_checkpoints", [1, 2])
def test_trak_follows_the_formula(n_checkpoints):
    model, train, test = make_problem()
    states = []
    for c in range(n_checkpoints):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + 0.3 * c)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    attr = Attributor(model, loss_fn, method="trak", output_fn=margin, damping=1e-2, checkpoints=states, **EXACT)
    scores = attr.cache(train).attribute(test)
    expected, keep = 0, 0
    for state in states:
        model.load_state_dict(state)
        feats = [dense_grads(model, batches, margin) for batches in (train, test)]
        for g, q in zip(*feats):
            fim = g.T @ g / g.shape[0] + 1e-2 * torch.eye(g.shape[1], dtype=torch.float64)
            expected = expected + q @ torch.linalg.solve(fim, g.T)
        with torch.no_grad():
            keep = keep + (1 - torch.sigmoid(torch.cat([margin(model, b) for b in train])))
    expected = expected / n_checkpoints * (keep / n_checkpoints)[None, :]
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-8)


def test_true_fisher_is_the_expectation_over_classes():
    model, train, test = make_problem()
    logits_fn = lambda m, b: m(b[0])  # noqa: E731
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, damping=1e-2, dtype=torch.float64,
                      fisher="true", logits_fn=logits_fn, compile=False, progress=False)
    scores = attr.cache(train).attribute(test)
    g_train, g_test = dense_grads(model, train), dense_grads(model, test)
    x = torch.cat([b[0] for b in train])
    probs = torch.softmax(model(x), -1).detach()
    expected = 0
    for j, layer in enumerate((model[0], model[2])):
        fim = 0
        for c in range(4):
            for i in range(N_TRAIN):
                model.zero_grad()
                nn.functional.cross_entropy(model(x[i : i + 1]), torch.tensor([c])).backward()
                g = layer.weight.grad.T.flatten()
                fim = fim + probs[i, c] * torch.outer(g, g)
        fim = fim / N_TRAIN + 1e-2 * torch.eye(g.numel(), dtype=torch.float64)
        expected = expected + g_test[j] @ torch.linalg.solve(fim, g_train[j].T)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-7)


class Conv1D(nn.Module):
    """Same layout as transformers' GPT-2 Conv1D: y = x @ W + b, W [d_in, d_out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_conv1d_layers_and_sequences():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 6), nn.Tanh(), Conv1D(3, 12))
    x = torch.randn(8, 5, 6, dtype=torch.float64)  # [B, T, d]: per-sample loss sums over tokens

    def seq_loss(m, b):
        return m(b).pow(2).sum(dim=(1, 2))

    attr = Attributor(model, seq_loss, method="graddot", compressor="identity", k=10**6, dtype=torch.float64,
                      compile=False, progress=False)
    scores = attr.cache([x]).attribute([x[:2]])
    grads = []
    for i in range(8):
        model.zero_grad()
        seq_loss(model, x[i : i + 1]).sum().backward()
        grads.append(torch.cat([model[0].weight.grad.flatten(), model[2].weight.grad.flatten()]))
    g = torch.stack(grads)
    torch.testing.assert_close(scores, g[:2] @ g.T)


class EmbedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)).mean(1))


def test_other_parameters_use_vmap_grad(tmp_path):
    torch.manual_seed(0)
    model = EmbedModel().double()
    tokens = torch.randint(0, 12, (10, 4))
    labels = torch.randint(0, 3, (10,))
    batches = [(tokens[:6], labels[:6]), (tokens[6:], labels[6:])]
    kwargs = dict(method="graddot", compressor="identity", param_compressor="identity", k=10**6,
                  dtype=torch.float64, progress=False, param_chunk=4)
    eager = Attributor(model, loss_fn, params=["embed.weight", "norm.*"], compile=False, **kwargs)
    scores = eager.cache(batches).attribute(batches[:1])
    assert eager.block_names == ["head", "param:embed.weight", "param:norm.weight", "param:norm.bias"]
    rows = []
    for i in range(10):
        model.zero_grad()
        loss_fn(model, (tokens[i : i + 1], labels[i : i + 1])).sum().backward()
        rows.append(torch.cat([model.head.weight.grad.T.flatten()] + [p.grad.flatten() for p in
                               (model.embed.weight, model.norm.weight, model.norm.bias)]))
    g = torch.stack(rows)
    torch.testing.assert_close(scores, g[:6] @ g.T)
    compiled = Attributor(model, loss_fn, params=["embed.weight", "norm.*"], compile=True, **kwargs)
    torch.testing.assert_close(compiled.cache(batches).attribute(batches[:1]), scores)
    only_params = Attributor(model, loss_fn, layers=[], params=["norm.bias"], compile=False, **kwargs)
    torch.testing.assert_close(only_params.cache(batches).attribute(batches[:1]), g[:6, -6:] @ g[:, -6:].T)
    with pytest.raises(ValueError, match="'nope' matches no parameter"):
        Attributor(model, loss_fn, params=["nope"], compile=False, **kwargs)


def test_a_single_compressor_object_serves_layers_of_its_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (8,))
    shared = grass_ops.SJLT(36, 12, seed=1)
    attr = Attributor(model, loss_fn, method="graddot", compressor=shared, k=12, dtype=torch.float64, compile=False,
                      progress=False)
    scores = attr.cache([(x, y)]).attribute([(x[:2], y[:2])])
    dense = shared(torch.cat(dense_grads(model, [(x, y)], layers=[model[0], model[2]]), 0).float()).double()
    g = dense.reshape(2, 8, 12).permute(1, 0, 2).reshape(8, 24)  # both layers' projections side by side
    torch.testing.assert_close(scores, g[:2] @ g.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="other sizes"):
        Attributor(model, loss_fn, compressor=grass_ops.SJLT(35, 12), k=12, compile=False)


@pytest.mark.parametrize("method", ["if", "graddot"])
def test_normalized_scores_divide_by_both_gradient_norms(method):
    """normalize=True: IF (or GradDot) on unit-normalized gradients; GradDot normalized is GradCos."""
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, method=method, damping=1e-2, normalize=True, memory_budget=8 * 200 * 5,
                      **EXACT).cache(train)
    expected, g_train, g_test = closed_form(model, train, test, 1e-2, method)
    norms_test, norms_train = torch.cat(g_test, 1).norm(dim=1), torch.cat(g_train, 1).norm(dim=1)
    expected = expected / (norms_test[:, None] * norms_train[None, :])
    scores = attr.attribute(test)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)
    values, indices = attr.top_k(test, k=4)
    assert torch.equal(indices, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :4])
    raw = Attributor(model, loss_fn, method=method, damping=1e-2, **EXACT).cache(train)
    self_raw = raw.self_influence()
    torch.testing.assert_close(attr.self_influence(), self_raw / norms_train.square(), rtol=1e-9, atol=1e-12)
    if method == "graddot":
        cos = Attributor(model, loss_fn, method="gradcos", **EXACT).cache(train)
        torch.testing.assert_close(scores, cos.attribute(test), rtol=1e-9, atol=1e-12)


def test_normalize_is_checked():
    model, _, _ = make_problem()
    with pytest.raises(TypeError, match="normalize must be a bool"):
        Attributor(model, loss_fn, normalize="yes", **EXACT)
    with pytest.raises(ValueError, match="normalize=True is for"):
        Attributor(model, loss_fn, method="trak", output_fn=margin, normalize=True, **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_small_stores_fim_is_decomposed_in_its_range(dtype):
    """Fewer samples than a block's width: the low-rank eigendecomposition's damped inverse is as close
    to the exact one as the full eigh's (closer in float32, whose rounding noise the full eigh keeps as
    eigenvalues); a wrong rank bound is caught by its residual check and the full eigh is used."""
    from attribution import fim

    torch.manual_seed(0)
    grads = torch.randn(5, 256, dtype=torch.float64) * torch.logspace(0, -2, 256, dtype=torch.float64)
    exact = fim.DampedInverse.from_fim(grads.T @ grads / 5, torch.float64)
    summed = grads.to(dtype).T @ grads.to(dtype) / 5
    full = fim.DampedInverse.from_fim(summed, torch.float64)
    fast = fim.DampedInverse.from_fim(summed, torch.float64, samples=5)
    torch.testing.assert_close(fast.eigvecs.T @ fast.eigvecs, torch.eye(256, dtype=torch.float64), rtol=0, atol=1e-10)
    assert int((fast.eigvals > 0).sum()) <= 5 + fim.LOW_RANK_OVERSAMPLE
    queries = torch.randn(3, 256, dtype=torch.float64)
    for damping in (1e-3, 1e-1):
        truth = exact.apply(queries, damping)
        error = {name: float((f.apply(queries, damping) - truth).norm() / truth.norm()) for name, f in
                 (("full", full), ("fast", fast))}
        assert error["fast"] <= max(error["full"], 1e-12) and error["fast"] < (1e-4 if dtype == torch.float32 else 1e-10)
    wide = torch.randn(40, 256, dtype=torch.float64).to(dtype)
    rank_40 = wide.T @ wide / 40
    assert fim.low_rank_eigh(rank_40.double(), 13, 100 * torch.finfo(dtype).eps) is None  # rank 40 > 13: refused
    wrong = fim.DampedInverse.from_fim(rank_40, torch.float64, samples=5)
    expected = fim.DampedInverse.from_fim(rank_40, torch.float64)
    assert torch.equal(wrong.eigvals, expected.eigvals) and torch.equal(wrong.eigvecs, expected.eigvecs)
