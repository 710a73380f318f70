"""preconditioner="kfac-whitened" / "ekfac-whitened": both sides whitened before compression (attribution.whitening).

The math against the uncompressed K-FAC / EK-FAC scores, the masks in the whitened coordinates, and the store's
seams: pass one and pass two interrupted and resumed, a grown store keeping its whitening, another process reading
it, several Attributors in one process, odd batches and two ranks; every misuse refused by name."""
import subprocess
import sys

import pytest
import torch
from attribution_problems import (
    N_TEST,
    N_TRAIN,
    Interrupt,
    dense_factors,
    grow_on_two_ranks_and_one,
    kronecker_closed_form,
    loss_fn,
    make_problem,
    one_thread,  # noqa: F401 - autouse fixture: one torch thread for these tiny problems
    sequence_closed_form,
    sequence_loss,
    sequence_problem,
    snapshot,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution import Attributor, kfac, whitening
from attribution.evaluation.metrics import pearson
from grass_ops import compressors as C
from grass_ops._hashing import derive_seed, random_mask

EXACT = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False)
SMALL = dict(compressor="factgrass", k=16, dtype=torch.float64, compile=False, progress=False)


class Killed:
    """A re-iterable loader that raises Interrupt at its ``after``-th batch counted over all its iterations."""

    def __init__(self, batches, after: int):
        self.batches, self.after, self.seen = batches, after, 0

    def __iter__(self):
        for batch in self.batches:
            if self.seen == self.after:
                raise Interrupt()
            self.seen += 1
            yield batch


# ---- the math ------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), t=st.integers(1, 3), d_in=st.integers(1, 4), d_out=st.integers(1, 4), seed=st.integers(0, 2**16),
       damping=st.sampled_from([1e-2, 0.3, "0.1*mean", "2*mean"]), kind=st.sampled_from(["kfac", "ekfac"]))
def test_whitened_rows_have_the_damped_inverse_curvature_as_their_inner_product(n, t, d_in, d_out, seed, damping, kind):
    """<W g_a, W g_b> = g_a^T (P + lambda I)^-1 g_b for the whitened compressor at full dimension, from the
    factors (in-backward form) and from the weight gradient alike."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(n, t, d_out, generator=gen, dtype=torch.float64)
    block = kfac.kfac_blocks(kfac.factor_sums({"w": x}, {"w": g}), ["w"], torch.float64)["w"]
    if kind == "ekfac":
        block.corrected = kfac.correction_sums({"w": block}, {"w": x}, {"w": g}).sums["w.L"] / n
    comp = whitening.whitened_compressor(C.Identity(d_in * d_out), block, damping, "energy", "w")
    grads = kfac.per_sample_gradients(x, g)
    rows = comp.compress_factors(x, g)
    torch.testing.assert_close(rows, comp(grads.flatten(1)), rtol=1e-10, atol=1e-10)
    expected = grads.flatten(1) @ block.apply(grads, damping).flatten(1).T
    torch.testing.assert_close(rows @ rows.T, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("damping", [1e-2, "0.1*mean"])
def test_identity_compressor_at_full_dimension_equals_the_uncompressed_kronecker_scores(kind, damping):
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, preconditioner=f"{kind}-whitened", damping=damping, **EXACT)
    scores = attr.cache(train).attribute(test)
    layers = [model[0], model[2]]
    expected = kronecker_closed_form(dense_factors(model, train, layers), dense_factors(model, test, layers), damping, kind)
    assert scores.shape == (N_TEST, N_TRAIN)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)
    # the one-sided preconditioner over a raw store gives the same numbers
    one_sided = Attributor(model, loss_fn, preconditioner=kind, damping=damping, **EXACT).cache(train).attribute(test)
    torch.testing.assert_close(scores, one_sided, rtol=1e-9, atol=1e-9)
    # self-influence is the diagonal of the training scores; top_k and query features agree with attribute
    train_scores = attr.attribute(train)
    torch.testing.assert_close(attr.self_influence(), torch.diagonal(train_scores), rtol=1e-9, atol=1e-9)
    _, indices = attr.top_k(test, k=5)
    assert torch.equal(indices, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :5])
    torch.testing.assert_close(attr.attribute(features=attr.query_features(test)), scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_sequences_whiten_the_gradient_summed_over_tokens(kind):
    model, x = sequence_problem()
    attr = Attributor(model, sequence_loss, preconditioner=f"{kind}-whitened", damping="0.5*mean", **EXACT)
    scores = attr.cache([x[:4], x[4:7], x[7:]]).attribute([x[:3]])  # batches of 4, 3 and 2
    torch.testing.assert_close(scores, sequence_closed_form(model, x, kind), rtol=1e-9, atol=1e-9)


def test_a_flat_compressor_compresses_the_whole_whitened_gradient():
    """SJLT of the rotated, scaled gradient: its scores are the SJLT of the exact whitened rows."""
    model, train, test = make_problem()
    exact = Attributor(model, loss_fn, preconditioner="kfac-whitened", damping=0.05, **EXACT).cache(train)
    sketched = Attributor(model, loss_fn, preconditioner="kfac-whitened", damping=0.05,
                          **{**EXACT, "compressor": "sjlt", "k": 64}).cache(train)
    rows = sketched.compress_batch(test[0])[0]
    full = exact.compress_batch(test[0])[0]
    for j, name in enumerate(sketched.layer_names):  # per layer: SJLT(full whitened row)
        sjlt = sketched.compressors[name].inner
        block = full[:, exact.compress.offsets[j]:exact.compress.offsets[j + 1]]
        torch.testing.assert_close(rows[:, sketched.compress.offsets[j]:sketched.compress.offsets[j + 1]], sjlt(block))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_whitening_both_sides_tracks_the_uncompressed_scores_better_than_preconditioning_the_query(kind):
    """The point of the design: at equal storage, <C(P^-1/2 g_q), C(P^-1/2 g_i)> correlates with the exact
    Kronecker scores better than <C(P^-1 g_q), C(g_i)> (the one-sided "kfac" / "ekfac")."""
    model, train, test = make_problem()
    exact = Attributor(model, loss_fn, preconditioner=kind, damping="0.1*mean", **EXACT).cache(train).attribute(test)

    def correlation(preconditioner):
        runs = [Attributor(model, loss_fn, preconditioner=preconditioner, damping="0.1*mean", seed=seed, **SMALL)
                .cache(train).attribute(test) for seed in range(3)]
        return float(torch.stack([pearson(s, exact).mean() for s in runs]).mean())

    whitened, one_sided = correlation(f"{kind}-whitened"), correlation(kind)
    assert whitened > one_sided + 0.15, (whitened, one_sided)


def test_energy_masks_keep_the_eigenvectors_with_the_most_whitened_second_moment():
    """K-FAC: the whitened second moment a_i b_j / (a_i b_j + lambda) grows with a_i and b_j, so FactGraSS's
    k_in / k_out kept eigenvectors are A's and G's leading ones; "random" masks draw them from the seed."""
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(20, 3, 12, generator=gen, dtype=torch.float64), torch.randn(20, 3, 9, generator=gen, dtype=torch.float64)
    x[..., 0] *= 5  # a dominant input direction
    block = kfac.kfac_blocks(kfac.factor_sums({"w": x}, {"w": g}), ["w"], torch.float64)["w"]
    base = C.FactGraSS(12, 9, 8, 4, 3, seed=5)
    energy = whitening.whitened_compressor(base, block, "0.1*mean", "energy", "w")
    leading_a = block.a_vecs[:, torch.sort(torch.argsort(block.a_vals, descending=True)[:4]).values]
    leading_g = block.g_vecs[:, torch.sort(torch.argsort(block.g_vals, descending=True)[:3]).values]
    assert torch.equal(energy.in_basis, leading_a) and torch.equal(energy.out_basis, leading_g)
    assert energy.out_features == 8 and isinstance(energy.inner, C.SelectiveMask)  # the 8 strongest of the 4 x 3 block
    kept = energy.scale.flatten()[energy.inner.indices]  # the smallest scales = the largest eigenvalues
    assert bool(kept.max() <= energy.scale.flatten().sort().values[7])
    random = whitening.whitened_compressor(base, block, "0.1*mean", "random", "w")
    again = whitening.whitened_compressor(C.FactGraSS(12, 9, 8, 4, 3, seed=5), block, "0.1*mean", "random", "w")
    other = whitening.whitened_compressor(C.FactGraSS(12, 9, 8, 4, 3, seed=6), block, "0.1*mean", "random", "w")
    assert random.basis_digest == again.basis_digest != other.basis_digest
    assert random.inner is base.projection  # the paper's FactGraSS in the eigenbasis: random masks, then its SJLT


def test_kept_share_is_the_whitened_second_moment_the_store_reaches():
    """kept_share: sum of Lambda/(Lambda+lambda) over the kept eigen-coordinates over the sum of all of them (1 for
    full masks and flat compressors); the cache records it per layer."""
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(30, 2, 12, generator=gen, dtype=torch.float64), torch.randn(30, 2, 9, generator=gen, dtype=torch.float64)
    block = kfac.kfac_blocks(kfac.factor_sums({"w": x}, {"w": g}), ["w"], torch.float64)["w"]
    eig = torch.outer(block.a_vals, block.g_vals)
    lam = 0.1 * float(eig.mean())
    share = eig / (eig + lam)
    base = C.FactGraSS(12, 9, 8, 4, 3, seed=5)
    rows = torch.sort(torch.argsort(block.a_vals, descending=True)[:4]).values
    cols = torch.sort(torch.argsort(block.g_vals, descending=True)[:3]).values
    strongest = torch.argsort(eig[rows][:, cols].flatten(), descending=True)[:8]  # FactGraSS keeps the 8 largest Lambda
    expected = share[rows][:, cols].flatten()[strongest].sum() / share.sum()
    assert whitening.kept_share(base, block, "0.1*mean", "energy", "w") == pytest.approx(float(expected), rel=1e-12)
    # LoGra keeps its 4 x 3 leading eigenvectors whole
    expected = share[rows][:, cols].sum() / share.sum()
    assert whitening.kept_share(C.LoGra(12, 9, 4, 3, seed=0), block, "0.1*mean", "energy", "w") == pytest.approx(
        float(expected), rel=1e-12)
    # flat masks (row-major coordinates i * 9 + j) count only what they keep; GraSS's SJLT mixes its 16 whole
    flat = share.flatten()
    for compressor, kept in ((C.RandomMask(108, 8, seed=3), random_mask(108, 8, 3)),
                             (C.GraSS(108, 8, 16, seed=4), random_mask(108, 16, derive_seed(4, 1)))):
        assert whitening.kept_share(compressor, block, "0.1*mean", "energy", "w") == pytest.approx(
            float(flat[kept].sum() / flat.sum()), rel=1e-12)
    # damping 0: every positive eigen-coordinate counts 1
    assert whitening.kept_share(base, block, 0.0, "energy", "w") == pytest.approx(8 / 108)
    # the random masks' SJLT mixes its whole 4 x 3 block: all of it counts
    rows, cols = random_mask(12, 4, derive_seed(5, 1)), random_mask(9, 3, derive_seed(5, 2))
    expected = share[rows][:, cols].sum() / share.sum()
    assert whitening.kept_share(base, block, "0.1*mean", "random", "w") == pytest.approx(float(expected), rel=1e-12)
    assert whitening.kept_share(C.SJLT(108, 8, seed=0), block, "0.1*mean", "energy", "w") == pytest.approx(1.0)
    assert whitening.kept_share(C.LoGra(12, 9, 12, 9, seed=0), block, "0.1*mean", "energy", "w") == pytest.approx(1.0)
    zero = kfac.kfac_blocks(kfac.factor_sums({"w": 0 * x}, {"w": g}), ["w"], torch.float64)["w"]
    assert whitening.kept_share(base, zero, 1e-3, "energy", "w") == 1.0  # no second moment: nothing to lose (not nan)

    model, train, _ = make_problem()
    attr = Attributor(model, loss_fn, **SMALL, preconditioner="kfac-whitened", damping="0.1*mean").cache(train)
    shares = attr.stats["whitening_kept_share"]
    assert list(shares) == [0] and list(shares[0]) == attr.block_names and all(0 < v < 1 for v in shares[0].values())


# ---- misuse --------------------------------------------------------------------------------------
def test_misuse_is_refused_by_name(tmp_path):
    model, train, test = make_problem()
    refused = [
        (dict(method="graddot"), "method='graddot' uses no preconditioner"),
        (dict(method="trak", output_fn=loss_fn), "whitens the loss gradients of method 'if'"),
        (dict(params=["0.bias"]), "params= blocks have no Kronecker factors"),
        (dict(optimizer_state={}), "optimizer_state is not supported"),
        (dict(whitening_masks="largest"), "whitening_masks must be one of"),
    ]
    for extra, message in refused:
        with pytest.raises((ValueError, TypeError), match=message):
            Attributor(model, loss_fn, **{**SMALL, "preconditioner": "kfac-whitened", **extra})
    with pytest.raises(ValueError, match="whitening_masks applies to preconditioner"):
        Attributor(model, loss_fn, **SMALL, whitening_masks="random")
    learned = [C.FactGraSS(24, 4, 16, 8, 4, in_mask=C.SelectiveMask(24, indices=torch.arange(8))),
               C.GraSS(96, 16, 32, mask=C.SelectiveMask(96, indices=torch.arange(32))),
               C.SelectiveMask(96, indices=torch.arange(16))]
    for comp in learned:  # refused when the Attributor is built, before any pass
        with pytest.raises(ValueError, match="layer '2': a learned mask"):
            Attributor(model, loss_fn, **{**SMALL, "compressor": {"0": C.FactGraSS(10, 24, 16, 8, 8), "2": comp}},
                       preconditioner="kfac-whitened")
    attr = Attributor(model, loss_fn, **SMALL, preconditioner="ekfac-whitened", store=tmp_path / "s", damping="0.1*mean")
    with pytest.raises(RuntimeError, match="holds no whitening for checkpoint 0 yet"):
        attr.compress_batch(test[0])
    with pytest.raises(ValueError, match="K-FAC and the whitened ones need the model"):
        attr.cache_gradients([torch.zeros(4, attr.compress.columns, dtype=torch.float64)])
    with pytest.raises(ValueError, match="curvature_loader is for preconditioner"):
        Attributor(model, loss_fn, **SMALL).cache(train, curvature_loader=train)
    with pytest.raises(TypeError, match="re-iterable"):
        attr.cache(iter(train))
    attr.cache(train)
    with pytest.raises(ValueError, match="cannot be re-damped to 0.5"):
        attr.attribute(test, damping=0.5)
    with pytest.raises(ValueError, match="cannot be re-damped"):
        attr.self_influence(damping=0.5)
    with pytest.raises(ValueError, match="different configuration \\(whitening"):  # another damping is another store
        Attributor(model, loss_fn, **SMALL, preconditioner="ekfac-whitened", store=tmp_path / "s", damping="0.2*mean")
    with pytest.raises(ValueError, match="different configuration \\(whitening"):
        Attributor(model, loss_fn, **SMALL, store=tmp_path / "s", damping="0.1*mean")
    before = snapshot(tmp_path / "s")
    with pytest.raises(ValueError, match="came from other curvature data"):
        attr.cache(train, curvature_loader=train[:2])
    assert snapshot(tmp_path / "s") == before
    attr.cache(train, curvature_loader=train)  # the same data: accepted


def test_shards_without_a_whitening_are_refused(tmp_path):
    """A whitened store whose whitening was deleted: its rows cannot be re-whitened consistently."""
    model, train, _ = make_problem()
    attr = Attributor(model, loss_fn, **SMALL, preconditioner="kfac-whitened", store=tmp_path / "s")
    attr.cache(train)
    with attr.store.writer():
        attr.store.remove_derived(0, whitening.RESULT)
    again = Attributor(model, loss_fn, **SMALL, preconditioner="kfac-whitened", store=tmp_path / "s")
    with pytest.raises(ValueError, match="holds shards of checkpoint 0 but no whitening"):
        again.cache(train)


# ---- the store's seams ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_an_interrupted_pass_one_and_pass_two_resume_to_the_fresh_result(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(kfac, "SAVE_SECONDS", 0.0)  # save the partial sums after every batch
    model, train, test = make_problem(n_train=45, batch=8)  # 6 batches, the last of 5 rows
    options = dict(**SMALL, preconditioner=f"{kind}-whitened", damping="0.1*mean")
    fresh = Attributor(model, loss_fn, **options, store=tmp_path / "fresh").cache(train).attribute(test)
    store = tmp_path / "resumed"
    # killed in pass one's A, G sums after 3 of the 6 batches; then (EK-FAC) in its correction pass, and in the cache
    kills = (3, 6 + 2, 6 + 6 + 4) if kind == "ekfac" else (3, 6 + 2, 4)
    for after in kills:
        with pytest.raises(Interrupt):
            Attributor(model, loss_fn, **options, store=store).cache(Killed(train, after))
    partials = [n for n in Attributor(model, loss_fn, **options, store=store).store.derived_names(0)
                if n.startswith("whitening_")]
    assert partials == [], partials  # pass one finished in the third run, then its partials were dropped
    resumed = Attributor(model, loss_fn, **options, store=store).cache(train).attribute(test)
    torch.testing.assert_close(resumed, fresh, rtol=0, atol=0)


def test_a_grown_store_keeps_its_whitening_and_equals_a_store_whitened_by_the_same_data(tmp_path):
    model, train, test = make_problem(n_train=45, batch=8)
    options = dict(**SMALL, preconditioner="ekfac-whitened", damping="0.1*mean")
    grown = Attributor(model, loss_fn, **options, store=tmp_path / "grown")
    grown.cache(train[:4])
    pinned = grown.store.derived_meta(0, whitening.RESULT)
    scores = grown.cache(train).attribute(test)  # two more batches: the whitening of the first four is kept
    assert grown.store.derived_meta(0, whitening.RESULT) == pinned and grown.n_train == 45
    direct = Attributor(model, loss_fn, **options, store=tmp_path / "direct").cache(train, curvature_loader=train[:4])
    torch.testing.assert_close(scores, direct.attribute(test), rtol=0, atol=0)
    assert pinned[1]["batches"] == 4 and pinned[1]["samples"] == 32


def test_a_fresh_process_reads_the_whitened_store(tmp_path):
    model, train, test = make_problem()
    options = dict(**SMALL, preconditioner="kfac-whitened", damping="0.1*mean", whitening_masks="random")
    attr = Attributor(model, loss_fn, **options, store=tmp_path / "s")
    scores = attr.cache(train).attribute(test)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from attribution_problems import make_problem, loss_fn
from attribution import Attributor
model, train, test = make_problem()
model.load_state_dict(torch.load({str(tmp_path / 'model.pt')!r}))
attr = Attributor(model, loss_fn, compressor="factgrass", k=16, dtype=torch.float64, compile=False, progress=False,
                  preconditioner="kfac-whitened", damping="0.1*mean", whitening_masks="random", store={str(tmp_path / 's')!r})
torch.save(attr.attribute(test), {str(tmp_path / 'scores.pt')!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "scores.pt"), scores, rtol=0, atol=0)


def test_many_whitened_attributors_in_one_process_stay_apart(tmp_path):
    model, train, test = make_problem()
    # each alone, in a store of its own (a memory store sums its blocks in another order: ~1e-15 apart)
    alone = {kind: Attributor(model, loss_fn, **SMALL, preconditioner=kind, damping="0.1*mean",
                              store=tmp_path / "alone" / kind).cache(train).attribute(test)
             for kind in ("kfac-whitened", "ekfac-whitened")}
    together = {kind: Attributor(model, loss_fn, **SMALL, preconditioner=kind, damping="0.1*mean", store=tmp_path / kind)
                for kind in ("kfac-whitened", "ekfac-whitened")}
    for attr in together.values():
        attr.cache(train)
    for kind, attr in together.items():
        torch.testing.assert_close(attr.attribute(test), alone[kind], rtol=0, atol=0)
    assert not torch.allclose(alone["kfac-whitened"], alone["ekfac-whitened"])


def test_the_smallest_batch_and_a_single_sample_curvature(tmp_path):
    model, train, test = make_problem(n_train=5, batch=1)  # five batches of one sample
    attr = Attributor(model, loss_fn, **SMALL, preconditioner="ekfac-whitened", damping="1*mean")
    scores = attr.cache(train, curvature_loader=train[:1]).attribute(test)
    assert scores.shape == (N_TEST, 5) and bool(torch.isfinite(scores).all())
    with pytest.raises(ValueError, match="damping must be > 0"):  # one sample's curvature is singular
        Attributor(model, loss_fn, **SMALL, preconditioner="kfac-whitened", damping=0.0).cache(train, curvature_loader=train[:1])


@pytest.mark.parametrize("preconditioner", ["kfac-whitened", "ekfac-whitened"])
def test_two_ranks_equal_one_process(tmp_path, preconditioner):
    """Pass one split over 2 gloo ranks (their partial sums merged by rank 0), then the cache and a grown store."""
    ranks, single = grow_on_two_ranks_and_one(tmp_path, dict(compressor="factgrass", k=16, compile=False, progress=False,
                                                              preconditioner=preconditioner, damping="0.1*mean"))
    for scores, grown in ranks:
        torch.testing.assert_close(scores, single[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grown, single[1], rtol=1e-4, atol=1e-4)


def test_each_checkpoint_has_its_own_whitening(tmp_path):
    """TracIn-CP-style checkpoints: pass one runs at each checkpoint's weights, and the weighted sum of the
    checkpoints' whitened scores equals that of the uncompressed one-sided K-FAC scores."""
    model, train, test = make_problem()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = {k: v + 0.05 * torch.randn_like(v) for k, v in first.items()}
    options = dict(**EXACT, checkpoints=[first, second], checkpoint_weights=[1.0, 0.5], damping="0.1*mean")
    attr = Attributor(model, loss_fn, preconditioner="ekfac-whitened", store=tmp_path / "s", **options)
    scores = attr.cache(train).attribute(test)
    expected = Attributor(model, loss_fn, preconditioner="ekfac", **options).cache(train).attribute(test)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)
    tags = {attr.store.derived_meta(c, whitening.RESULT)[0] for c in range(2)}
    assert len(tags) == 1  # the same curvature batches (the tag is their fingerprint) ...
    blocks = [attr.preconditioning.whitening.recorded(c).blocks["0"].g_vals for c in range(2)]
    assert not torch.allclose(blocks[0], blocks[1])  # ... at different weights
    assert sorted(attr.stats["whitening_kept_share"]) == [0, 1]  # each checkpoint's kept share
    with pytest.raises(ValueError, match="each checkpoint has its own whitening"):
        attr.compress_batch(test[0])


def test_query_features_of_a_store_whitened_by_other_data_are_refused(tmp_path):
    model, train, test = make_problem()
    options = dict(**SMALL, preconditioner="kfac-whitened", damping="0.1*mean")
    a = Attributor(model, loss_fn, **options, store=tmp_path / "a").cache(train)
    b = Attributor(model, loss_fn, **options, store=tmp_path / "b").cache(train, curvature_loader=train[:1])
    features = a.query_features(test)
    with pytest.raises(ValueError, match="not whitened by this store's curvature"):
        b.attribute(features=features)
    torch.testing.assert_close(a.attribute(features=features), a.attribute(test), rtol=0, atol=0)
    # precomputed queries (compress_batch's) carry this store's whitening
    own = a.features_from_gradients(a.compress_batch(test[0])[0])
    torch.testing.assert_close(a.attribute(features=own), a.attribute(test), rtol=0, atol=0)


def test_verify_reports_the_whitening_as_pinned(tmp_path):
    model, train, _ = make_problem()
    attr = Attributor(model, loss_fn, **SMALL, preconditioner="ekfac-whitened", store=tmp_path / "s").cache(train[:2])
    attr.cache(train)  # grown: the shards' fingerprint moves on, the whitening stays
    report = attr.verify()
    assert report["ok"] and report["derived"]["ckpt_000/whitening"].startswith("pinned")


def test_an_interrupted_pass_one_meeting_other_data_restarts_it(tmp_path, monkeypatch):
    """Pass one's partial sums are only intermediate (no row depends on them): other data drops them, with a warning."""
    monkeypatch.setattr(kfac, "SAVE_SECONDS", 0.0)
    model, train, test = make_problem(n_train=45, batch=8)
    options = dict(**SMALL, preconditioner="kfac-whitened", damping="0.1*mean")
    with pytest.raises(Interrupt):
        Attributor(model, loss_fn, **options, store=tmp_path / "s").cache(Killed(train, 3))
    other = [(x.flip(0), y.flip(0)) for x, y in train]  # the same samples, other batches' digests
    with pytest.warns(UserWarning, match="partial sums are dropped and the pass restarts"):
        scores = Attributor(model, loss_fn, **options, store=tmp_path / "s").cache(other).attribute(test)
    fresh = Attributor(model, loss_fn, **options, store=tmp_path / "fresh").cache(other).attribute(test)
    torch.testing.assert_close(scores, fresh, rtol=0, atol=0)
