"""K-FAC and EK-FAC preconditioners: the math against dense float64 references, the API, damping and errors."""
import numpy as np
import pytest
import torch
from attribution_problems import (
    N_TEST,
    N_TRAIN,
    closed_form,
    dense_factors,
    dense_grads,
    kronecker_closed_form,
    loss_fn,
    make_problem,
    one_thread,  # noqa: F401 - autouse fixture: one torch thread for these tiny problems
    sequence_closed_form,
    sequence_loss,
    sequence_problem,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attribution import Attributor
from attribution.evaluation.metrics import pearson
from attribution.fim import check_damping
from attribution.kfac import KroneckerBlock, correction_sums, factor_sums, kfac_blocks, per_sample_gradients

EXACT = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False)




# ---- the preconditioner of one layer against a dense float64 reference -------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), t=st.integers(1, 3), d_in=st.integers(1, 4), d_out=st.integers(1, 4), seed=st.integers(0, 2**16),
       damping=st.sampled_from([1e-2, 0.3, "0.1*mean", "2*mean"]), kind=st.sampled_from(["kfac", "ekfac"]))
def test_inverse_applied_to_a_gradient_equals_the_closed_form(n, t, d_in, d_out, seed, damping, kind):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(n, t, d_out, generator=gen, dtype=torch.float64)
    query = torch.randn(2, d_in, d_out, generator=gen, dtype=torch.float64)
    # split the data into two batches: the sums are additive
    sums = factor_sums({"w": x[: n // 2]}, {"w": g[: n // 2]}) if n > 1 else None
    rest = factor_sums({"w": x[n // 2 :]}, {"w": g[n // 2 :]})
    if sums is None:
        sums = rest
    else:
        sums.add(rest)
    block = kfac_blocks(sums, ["w"], torch.float64)["w"]
    a = x.reshape(-1, d_in).T @ x.reshape(-1, d_in) / (n * t)  # per token
    gg = g.reshape(-1, d_out).T @ g.reshape(-1, d_out) / n  # per sample, summed over tokens
    torch.testing.assert_close(block.a_vecs @ torch.diag(block.a_vals) @ block.a_vecs.T, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(block.g_vecs @ torch.diag(block.g_vals) @ block.g_vecs.T, gg, rtol=1e-10, atol=1e-10)
    basis = torch.kron(block.a_vecs, block.g_vecs)  # row-major vec: (A (x) G) vec(M) = vec(A M G)
    if kind == "kfac":
        eig = torch.kron(block.a_vals, block.g_vals)
    else:
        block.corrected = correction_sums({"w": block}, {"w": x}, {"w": g}).sums["w.L"] / n
        grads = per_sample_gradients(x, g).flatten(1)
        eig = ((grads @ basis) ** 2).mean(0)  # the second moments of the gradients in the Kronecker eigenbasis
        torch.testing.assert_close(block.eigenvalues().flatten(), eig, rtol=1e-10, atol=1e-12)
    lam = float(damping.split("*")[0]) * float(eig.mean()) if isinstance(damping, str) else damping
    dense = basis @ torch.diag(eig + lam) @ basis.T
    expected = torch.linalg.solve(dense, query.flatten(1).T).T
    torch.testing.assert_close(block.apply(query, damping).flatten(1), expected, rtol=1e-8, atol=1e-10)
    if kind == "kfac":  # K-FAC is (A (x) G + lambda I)^-1 itself
        torch.testing.assert_close(dense, torch.kron(a, gg) + lam * torch.eye(d_in * d_out, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-9)


# ---- scores ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("damping", [1e-2, "0.1*mean"])
def test_identity_compressor_scores_equal_the_dense_formula(kind, damping):
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, preconditioner=kind, damping=damping, **EXACT)
    scores = attr.cache(train).attribute(test)
    layers = [model[0], model[2]]
    expected = kronecker_closed_form(dense_factors(model, train, layers), dense_factors(model, test, layers), damping, kind)
    assert scores.shape == (N_TEST, N_TRAIN) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)
    # query_features (reusable across dampings) and the streamed queries agree
    features = attr.query_features(test)
    torch.testing.assert_close(attr.attribute(features=features), scores, rtol=1e-12, atol=1e-12)
    values, indices = attr.top_k(test, k=5)
    assert torch.equal(indices, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :5])


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_sequences_sum_over_tokens(kind):
    """T > 1: A averages over tokens, G sums over a sample's tokens, EK-FAC uses the per-sample gradients."""
    model, x = sequence_problem()
    attr = Attributor(model, sequence_loss, method="if", preconditioner=kind, damping="0.5*mean", **EXACT)
    scores = attr.cache([x[:4], x[4:]]).attribute([x[:3]])
    torch.testing.assert_close(scores, sequence_closed_form(model, x, kind), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("compressor", ["factgrass", "logra", "sjlt"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_compressed_scores_approach_the_uncompressed_ones_as_k_grows(compressor, kind):
    model, train, test = make_problem()
    exact = Attributor(model, loss_fn, preconditioner=kind, damping="1*mean", **EXACT).cache(train).attribute(test)

    def correlation(k):  # mean over seeds of the per-query Pearson correlation with the exact scores
        runs = [Attributor(model, loss_fn, compressor=compressor, k=k, seed=seed, preconditioner=kind, damping="1*mean",
                           dtype=torch.float64, compile=False, progress=False).cache(train).attribute(test)
                for seed in range(4)]
        return float(torch.stack([pearson(s, exact).mean() for s in runs]).mean())

    small, large = correlation(4), correlation(240)  # 240 = the first layer's size (k is capped per layer)
    assert large > small + 0.2 and large > 0.5, (small, large)


def test_damping_can_change_without_recomputing(tmp_path):
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, preconditioner="ekfac", damping=1e-2, store=tmp_path, **EXACT).cache(train)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "lock"}
    layers = [model[0], model[2]]
    train_f, test_f = dense_factors(model, train, layers), dense_factors(model, test, layers)
    for damping in (1e-1, "0.3*mean", 1e-3):
        attr.damping = damping
        expected = kronecker_closed_form(train_f, test_f, check_damping(damping), "ekfac")
        torch.testing.assert_close(attr.attribute(test), expected, rtol=1e-9, atol=1e-9)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "lock"} == files


def test_relative_damping_of_the_fim_is_a_fraction_of_each_blocks_mean_eigenvalue():
    model, train, test = make_problem()
    scores = Attributor(model, loss_fn, damping="0.2*mean", **EXACT).cache(train).attribute(test)
    g_train, g_test = dense_grads(model, train), dense_grads(model, test)
    expected = 0
    for g, q in zip(g_train, g_test):
        fim = g.T @ g / g.shape[0]
        lam = 0.2 * float(torch.linalg.eigvalsh(fim).clamp_min(0).mean())
        expected = expected + q @ torch.linalg.solve(fim + lam * torch.eye(fim.shape[0], dtype=torch.float64), g.T)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("value, expected", [("0.1*mean", "0.1*mean"), (" 1e-3 * mean", "0.001*mean"), (2, 2.0),
                                             ("0*mean", "0.0*mean")])
def test_damping_values_are_normalized(value, expected):
    assert check_damping(value) == expected


@pytest.mark.parametrize("value, error", [("mean", TypeError), ("0.1*max", ValueError), ("-1*mean", ValueError),
                                          ("nan*mean", ValueError), ("inf*mean", ValueError), ("abc", TypeError),
                                          ("0.5", TypeError)])
def test_bad_dampings_are_refused(value, error):
    with pytest.raises(error, match="damping must be a .*'<factor>\\*mean'"):
        check_damping(value)
    model, _, _ = make_problem()
    with pytest.raises(error, match="damping"):
        Attributor(model, loss_fn, damping=value, **EXACT)


def test_preconditioner_none_is_graddot():
    model, train, test = make_problem()
    scores = Attributor(model, loss_fn, preconditioner="none", **EXACT).cache(train).attribute(test)
    graddot = Attributor(model, loss_fn, method="graddot", **EXACT).cache(train).attribute(test)
    torch.testing.assert_close(scores, graddot)
    attr = Attributor(model, loss_fn, preconditioner="none", **EXACT).cache(train)
    torch.testing.assert_close(attr.self_influence(), torch.diagonal(attr.attribute(train)))


def test_params_blocks_use_their_fim_next_to_kfac_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    train, test = [(x[:12], y[:12]), (x[12:], y[12:])], [(x[:5], y[:5])]
    kwargs = dict(params=["1.weight"], param_compressor="identity", damping=0.05, **EXACT)
    both = Attributor(model, loss_fn, preconditioner="kfac", **kwargs).cache(train).attribute(test)
    layers_only = Attributor(model, loss_fn, preconditioner="kfac", **{**kwargs, "params": None}).cache(train).attribute(test)
    norm_only = Attributor(model, loss_fn, layers=[], **kwargs).cache(train).attribute(test)  # fim of the params block
    torch.testing.assert_close(both, layers_only + norm_only, rtol=1e-9, atol=1e-9)


def test_trak_with_kfac_follows_the_formula():
    model, train, test = make_problem()
    from attribution_problems import margin

    attr = Attributor(model, loss_fn, method="trak", output_fn=margin, preconditioner="kfac", damping=1e-2, **EXACT)
    scores = attr.cache(train).attribute(test)
    layers = [model[0], model[2]]
    expected = kronecker_closed_form(dense_factors(model, train, layers, margin), dense_factors(model, test, layers, margin),
                                     1e-2, "kfac")
    with torch.no_grad():
        keep = 1 - torch.sigmoid(torch.cat([margin(model, b) for b in train]))
    torch.testing.assert_close(scores, expected * keep[None, :], rtol=1e-8, atol=1e-8)


# ---- errors ------------------------------------------------------------------------------------
def test_arguments_are_checked():
    model, train, test = make_problem()
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        Attributor(model, loss_fn, preconditioner="shampoo", **EXACT)
    with pytest.raises(ValueError, match="method='graddot' uses no preconditioner"):
        Attributor(model, loss_fn, method="graddot", preconditioner="kfac", **EXACT)
    with pytest.raises(ValueError, match="empirical Fisher"):
        Attributor(model, loss_fn, preconditioner="ekfac", fisher="true", logits_fn=lambda m, b: m(b[0]), **EXACT)
    with pytest.raises(ValueError, match="needs target linear layers"):
        Attributor(model, loss_fn, preconditioner="kfac", layers=[], params=["0.bias"], **EXACT)
    attr = Attributor(model, loss_fn, preconditioner="kfac", **EXACT).cache(train)
    with pytest.raises(ValueError, match="self_influence with preconditioner='kfac'"):
        attr.self_influence()
    fim_features = Attributor(model, loss_fn, **EXACT).cache(train).query_features(test)
    with pytest.raises(ValueError, match="needs features from this Attributor's query_features"):
        attr.attribute(features=fim_features)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_non_finite_factors_are_a_clear_error(kind):
    """An input of 1e20 saturates the tanh (finite loss, zero gradient), but x x^T overflows float32."""
    model, train, _ = make_problem(torch.float32)
    bad = [(b[0].clone(), b[1]) for b in train]
    bad[1][0][3] = 1e20
    with pytest.raises(FloatingPointError, match="input factor A of layer '0' holds non-finite values"):
        Attributor(model, loss_fn, preconditioner=kind, compressor="factgrass", k=16, compile=False,
                   progress=False).cache(bad)


def test_eigendecompositions_are_float64_and_stored_in_the_run_dtype(tmp_path):
    model, train, _ = make_problem(torch.float32)
    Attributor(model, loss_fn, preconditioner="ekfac", compressor="factgrass", k=16, store=tmp_path, compile=False,
               progress=False).cache(train)
    folder = tmp_path / "ckpt_000"
    assert np.load(folder / "kfac" / "eig.0.a_vals.npy").dtype == np.float64
    assert np.load(folder / "kfac" / "eig.0.a_vecs.npy").dtype == np.float32
    assert np.load(folder / "kfac" / "sum.0.A.npy").dtype == np.float64
    assert np.load(folder / "ekfac" / "corrected.2.npy").shape == (24, 4)


def test_singular_curvature_needs_a_positive_damping():
    block = KroneckerBlock(torch.tensor([0.0, 2.0], dtype=torch.float64), torch.eye(2, dtype=torch.float64),
                           torch.ones(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64))
    assert block.mean_eigenvalue() == 1.0
    with pytest.raises(ValueError, match="damping must be > 0"):
        block.apply(torch.ones(1, 2, 1, dtype=torch.float64), 0.0)
    torch.testing.assert_close(block.apply(torch.ones(1, 2, 1, dtype=torch.float64), "0.5*mean").flatten(),
                               torch.tensor([2.0, 0.4], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_normalized_kfac_scores_equal_streamed_and_from_features(kind):
    """normalize=True divides by the raw query norm whether the queries are streamed (preconditioned
    while read) or come from query_features."""
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, preconditioner=kind, damping="0.1*mean",
                      normalize=True, dtype=torch.float64, compile=False, progress=False).cache(train)
    raw = Attributor(model, loss_fn, compressor="identity", k=10**6, preconditioner=kind, damping="0.1*mean",
                     dtype=torch.float64, compile=False, progress=False).cache(train)
    streamed = attr.attribute(test)
    torch.testing.assert_close(streamed, attr.attribute(features=attr.query_features(test)), rtol=1e-9, atol=1e-12)
    _, g_train, g_test = closed_form(model, train, test, 1e-2, "graddot")
    norms_test, norms_train = torch.cat(g_test, 1).norm(dim=1), torch.cat(g_train, 1).norm(dim=1)
    torch.testing.assert_close(streamed, raw.attribute(test) / (norms_test[:, None] * norms_train[None, :]),
                               rtol=1e-9, atol=1e-12)
    assert torch.equal(attr.select(test, n=5)[1], attr.select(features=attr.query_features(test), n=5)[1])


def test_kfac_passes_run_the_model_in_eval_mode():
    """A model left in train mode (dropout active) gets the same K-FAC scores as in eval mode, and its
    mode is restored afterwards."""
    _, train, test = make_problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.Dropout(0.5), nn.Tanh(), nn.Linear(24, 4)).double()
    kw = dict(compressor="identity", k=10**6, preconditioner="ekfac", damping="0.1*mean", dtype=torch.float64,
              compile=False, progress=False)
    model.eval()
    expected = Attributor(model, loss_fn, **kw).cache(train).attribute(test)
    model.train()
    attr = Attributor(model, loss_fn, **kw).cache(train)
    assert model.training
    torch.testing.assert_close(attr.attribute(test), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(attr.attribute(features=attr.query_features(test)), expected, rtol=1e-9, atol=1e-12)
    assert model.training


@pytest.mark.parametrize("damping", [0.0, "0*mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preconditioner", ["fim", "kfac", "ekfac"])
def test_zero_damping_on_a_singular_curvature_is_refused_by_every_preconditioner(preconditioner, dtype, damping):
    """The output layer's gradients sum to zero over the classes (softmax), so its curvature is singular
    in every preconditioner; the null directions' eigenvalues come out as rounding noise (EK-FAC's near
    1e-34, not 0), which counts as zero."""
    model, train, test = make_problem(dtype)
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, dtype=dtype, preconditioner=preconditioner,
                      damping=damping, compile=False, progress=False).cache(train)
    with pytest.raises(ValueError, match="damping must be > 0: .*singular"):
        attr.attribute(test)


def test_eigenvalues_below_the_relative_tolerance_count_as_zero():
    eye = torch.eye(2, dtype=torch.float64)
    block = KroneckerBlock(torch.ones(2, dtype=torch.float64), eye, torch.ones(1, dtype=torch.float64), eye[:1, :1],
                           corrected=torch.tensor([[1e-34], [2.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="damping must be > 0"):
        block.apply(torch.ones(1, 2, 1, dtype=torch.float64), 0.0)
    block.corrected = torch.tensor([[1e-6], [2.0]], dtype=torch.float64)  # small, far above float64 rounding
    torch.testing.assert_close(block.apply(torch.ones(1, 2, 1, dtype=torch.float64), 0.0).flatten(),
                               torch.tensor([1e6, 0.5], dtype=torch.float64))
