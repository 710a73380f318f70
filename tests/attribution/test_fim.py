"""attribution.fim: the damping forms, the accumulated FIM, its damped inverse against closed forms on tiny
tensors, the stored arrays and the true Fisher's relabelled gradients."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.fim import (
    DampedInverse,
    FIMAccumulator,
    TrueFisherGradients,
    absolute_damping,
    block_fims,
    check_damping,
    from_arrays,
    to_arrays,
)
from attribution.store import CorruptStoreError


def _spd(k: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """A symmetric positive semi-definite [k, k] float64 matrix of the given rank (default full)."""
    g = torch.randn(rank or k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return g.T @ g / (rank or k)


# ---- damping forms -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [(0, 0.0), (1e-3, 1e-3), (2, 2.0), (np.float32(0.5), 0.5),
                                             ("0.1*mean", "0.1*mean"), (" 0.1 * mean ", "0.1*mean"),
                                             ("1e-2*mean", "0.01*mean"), ("0*mean", "0.0*mean")])
def test_check_damping_normalizes_absolute_and_relative_forms(value, expected):
    assert check_damping(value) == expected


@pytest.mark.parametrize("value, error, message", [
    (True, TypeError, "real number"), (None, TypeError, "real number"), ([1e-3], TypeError, "real number"),
    ("0.1", TypeError, "'<factor>\\*mean'"), (-1e-3, ValueError, "finite number >= 0"),
    (math.inf, ValueError, "finite number >= 0"), (math.nan, ValueError, "finite number >= 0"),
    ("0.1*max", ValueError, "finite factor >= 0"), ("x*mean", ValueError, "finite factor >= 0"),
    ("-1*mean", ValueError, "finite factor >= 0"), ("inf*mean", ValueError, "finite factor >= 0"),
])
def test_check_damping_refuses_other_values_naming_the_argument(value, error, message):
    with pytest.raises(error, match=message) as caught:
        check_damping(value, name="lam")
    assert str(caught.value).startswith("lam must be")


def test_absolute_damping_is_the_number_or_the_factor_times_the_mean_eigenvalue():
    assert absolute_damping(0.25, 100.0) == 0.25
    assert absolute_damping(check_damping("0.5*mean"), 4.0) == 2.0
    assert absolute_damping("0.0*mean", 7.0) == 0.0


# ---- the accumulated FIM -------------------------------------------------------------------------------
def test_accumulator_sums_outer_products_with_row_weights():
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]])
    w = torch.tensor([0.5, 2.0, 1.0])
    plain, weighted = FIMAccumulator(2, "cpu"), FIMAccumulator(2, "cpu")
    plain.add(g[:2])
    plain.add(g[2:])  # the sum does not depend on how the rows arrive
    weighted.add(g, w)
    torch.testing.assert_close(plain.sum, g.T @ g)
    torch.testing.assert_close(weighted.sum, g.T @ torch.diag(w) @ g)
    assert plain.sum.dtype == torch.float32 and FIMAccumulator(2, "cpu", torch.float64).sum.dtype == torch.float64


def test_finalize_divides_by_n_and_refuses_no_samples():
    acc = FIMAccumulator(3, "cpu", torch.float64)
    g = torch.randn(5, 3, dtype=torch.float64)
    acc.add(g)
    inverse = acc.finalize(5, torch.float64)
    v = inverse.eigvecs
    torch.testing.assert_close(v @ torch.diag(inverse.eigvals) @ v.T, g.T @ g / 5)
    with pytest.raises(ValueError, match="at least one training sample"):
        acc.finalize(0)


def test_block_fims_equal_the_dense_per_block_sums():
    grads = torch.randn(7, 5, dtype=torch.float64)
    weights = torch.rand(7, dtype=torch.float64)
    pairs = [(grads[:4], weights[:4]), (grads[4:], weights[4:])]
    fims = block_fims(pairs, lambda x: [x[:, :2], x[:, 2:]], [2, 3], 7, "cpu", torch.float64)
    for fim, (a, b) in zip(fims, [(0, 2), (2, 5)]):
        block = grads[:, a:b]
        expected = block.T @ torch.diag(weights) @ block / 7
        torch.testing.assert_close(fim.eigvecs @ torch.diag(fim.eigvals) @ fim.eigvecs.T, expected)


# ---- the damped inverse --------------------------------------------------------------------------------
def test_apply_and_quadratic_equal_the_closed_form_for_absolute_and_relative_damping():
    fim = _spd(4)
    inverse = DampedInverse.from_fim(fim, torch.float64)
    vectors = torch.randn(3, 4, dtype=torch.float64)
    mean = float(torch.linalg.eigvalsh(fim).mean())
    for damping, lam in [(1e-2, 1e-2), ("0.5*mean", 0.5 * mean)]:
        solved = torch.linalg.solve(fim + lam * torch.eye(4, dtype=torch.float64), vectors.T).T
        torch.testing.assert_close(inverse.apply(vectors, damping), solved)
        torch.testing.assert_close(inverse.quadratic(vectors, damping), (vectors * solved).sum(1))


def test_apply_keeps_the_vectors_dtype_and_an_asymmetric_fim_is_symmetrized():
    fim = _spd(3)
    skewed = fim + torch.tensor([[0.0, 1e-3, 0.0], [-1e-3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    inverse = DampedInverse.from_fim(skewed)
    assert inverse.eigvecs.dtype == torch.float32 and inverse.eigvals.dtype == torch.float64
    out = inverse.apply(torch.ones(2, 3), 0.1)
    assert out.dtype == torch.float32
    expected = torch.linalg.solve(fim + 0.1 * torch.eye(3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)).T
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6)


def test_zero_damping_inverts_a_regular_fim_and_refuses_a_singular_one():
    regular = DampedInverse.from_fim(_spd(3), torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(regular.apply(v, 0.0), torch.linalg.solve(_spd(3), v.T).T)
    singular = DampedInverse.from_fim(torch.zeros(3, 3, dtype=torch.float64), torch.float64)
    for call in (singular.apply, singular.quadratic):
        with pytest.raises(ValueError, match="damping must be > 0: the FIM is singular"):
            call(v, 0.0)
        with pytest.raises(ValueError, match="the FIM is singular"):  # relative damping of an all-zero FIM is 0 too
            call(v, "0.1*mean")


def test_negative_eigenvalues_from_rounding_are_clamped_and_non_finite_fims_refused():
    fim = torch.tensor([[1.0, 0.0], [0.0, -1e-12]], dtype=torch.float64)
    assert DampedInverse.from_fim(fim).eigvals.min() == 0.0
    with pytest.raises(FloatingPointError, match="non-finite"):
        DampedInverse.from_fim(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]))


@settings(deadline=None, max_examples=15)
@given(k=st.integers(1, 6), rank=st.integers(1, 6), damping=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_apply_inverts_the_damped_fim(k, rank, damping, seed):
    fim = _spd(k, rank, seed)  # often singular: the damping keeps it invertible
    inverse = DampedInverse.from_fim(fim, torch.float64)
    v = torch.randn(2, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    back = inverse.apply(v, damping) @ (fim + damping * torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(back, v, rtol=1e-7, atol=1e-9)
    assert bool((inverse.quadratic(v, damping) >= 0).all())


# ---- the stored form -----------------------------------------------------------------------------------
def test_arrays_round_trip_and_malformed_arrays_name_the_block():
    fims = [DampedInverse.from_fim(_spd(2)), DampedInverse.from_fim(_spd(3, seed=1))]
    arrays = to_arrays(fims)
    assert sorted(arrays) == ["block_000.eigvals", "block_000.eigvecs", "block_001.eigvals", "block_001.eigvecs"]
    back = from_arrays(arrays, [2, 3], "here")
    for a, b in zip(fims, back):
        assert torch.equal(a.eigvals, b.eigvals) and torch.equal(a.eigvecs, b.eigvecs)
    with pytest.raises(CorruptStoreError, match="here: block 1's eigendecomposition is missing or malformed"):
        from_arrays(arrays, [2, 4], "here")
    missing = {k: v for k, v in arrays.items() if k != "block_000.eigvecs"}
    with pytest.raises(CorruptStoreError, match="block 0"):
        from_arrays(missing, [2, 3], "here")
    integers = {**arrays, "block_000.eigvals": arrays["block_000.eigvals"].astype(np.int64)}
    with pytest.raises(CorruptStoreError, match="block 0"):
        from_arrays(integers, [2, 3], "here")


# ---- the true Fisher -----------------------------------------------------------------------------------
class _Logits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, batch):
        return self.logits[batch]


def _true_fisher(fisher: str, logits_fn=None):
    seen = []

    def gradients(batch_and_labels, loss):
        seen.append((batch_and_labels, loss))
        return torch.zeros(len(batch_and_labels[1]), 2)

    fn = logits_fn or (lambda model, batch: model(batch))
    return TrueFisherGradients(fisher, fn, gradients, "cpu"), seen


def test_true_fisher_weights_every_class_by_its_probability():
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    fisher, seen = _true_fisher("true")
    draws = list(fisher(_Logits(logits), torch.tensor([0, 1]), torch.Generator()))
    probs = torch.softmax(logits.double(), -1)
    assert len(draws) == 3 and len(seen) == 3
    for c, ((batch, labels), _), (_, weights) in zip(range(3), seen, draws):
        assert torch.equal(labels, torch.full((2,), c)) and torch.equal(batch, torch.tensor([0, 1]))
        torch.testing.assert_close(weights, probs[:, c])
    model = _Logits(logits)
    (batch, labels), loss = seen[1]
    torch.testing.assert_close(loss(model, (batch, labels)), torch.nn.functional.cross_entropy(logits, labels, reduction="none"))


def test_sampled_true_fisher_draws_one_label_stream_from_the_generator():
    logits = torch.randn(6, 4)
    runs = []
    for _ in range(2):
        fisher, seen = _true_fisher("true_sampled")
        draws = list(fisher(_Logits(logits), torch.arange(6), torch.Generator().manual_seed(3)))
        assert len(draws) == 1 and draws[0][1] is None
        runs.append(seen[0][0][1])
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (6,) and bool(((runs[0] >= 0) & (runs[0] < 4)).all())


@pytest.mark.parametrize("logits, message", [(torch.zeros(2), "logits \\[B, C\\]"), (torch.zeros(2, 1), "C >= 2"),
                                             (torch.zeros(2, 3, dtype=torch.long), "floating-point")])
def test_true_fisher_refuses_malformed_logits(logits, message):
    fisher, _ = _true_fisher("true", lambda model, batch: logits)
    with pytest.raises(ValueError, match=message):
        list(fisher(None, torch.arange(2), torch.Generator()))


def test_true_fisher_refuses_non_finite_logits():
    fisher, _ = _true_fisher("true", lambda model, batch: torch.tensor([[0.0, math.inf]]))
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        list(fisher(None, torch.arange(1), torch.Generator()))
