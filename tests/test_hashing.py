"""grass_ops._hashing: deterministic, platform-independent SJLT hashes, masks, seeds and sign streams."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import grass_ops
from grass_ops import compressors as C
from grass_ops.testing import seeds


@given(st.integers(1, 500), st.integers(1, 64), st.integers(1, 4), seeds)
def test_hash_is_deterministic_and_in_range(p, k, s, seed):
    s = min(s, k)
    idx, sign = grass_ops.sjlt_hash(p, k, s, seed)
    idx2, sign2 = grass_ops.sjlt_hash(p, k, s, seed)
    assert torch.equal(idx, idx2) and torch.equal(sign, sign2)
    assert idx.shape == sign.shape == (p, s) and idx.dtype == torch.int64 and sign.dtype == torch.int8
    assert int(idx.min()) >= 0 and int(idx.max()) < k
    assert bool(((sign == 1) | (sign == -1)).all())
    # block construction: the s buckets of each coordinate are distinct
    assert all(len(set(row)) == s for row in idx.tolist())


def test_hash_pinned_values():
    """Cross-platform determinism: these values are a pure function of (p, k, s, seed)."""
    idx, sign = grass_ops.sjlt_hash(6, 8, 2, seed=0)
    assert idx.tolist() == [[1, 4], [3, 7], [2, 4], [0, 7], [2, 7], [2, 6]]
    assert sign.tolist() == [[1, -1], [1, 1], [-1, -1], [-1, 1], [-1, -1], [-1, 1]]
    assert grass_ops.random_mask(20, 5, seed=0).tolist() == [3, 7, 14, 15, 18]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: grass_ops.sjlt_hash(10, 2, 3), ValueError, "s must be <= k"),
        (lambda: grass_ops.sjlt_hash(0, 4), ValueError, r"p must be an int in \[1, 2\*\*63 - 1 \(int64\)\], got 0"),
        (lambda: grass_ops.sjlt_hash(10, 0), ValueError, r"k must be an int in \[1, .*got 0"),
        (lambda: grass_ops.sjlt_hash(10, 4.0), TypeError, "k must be an int, got float 4.0"),
        (lambda: grass_ops.sjlt_hash(10, True), TypeError, "k must be an int, got bool True"),
        (lambda: grass_ops.sjlt_hash(10, 2**63), ValueError, r"k must be an int in \[1, 2\*\*63 - 1 \(int64\)\]"),
        (lambda: grass_ops.sjlt_hash(10, 4, seed=2**63), ValueError, r"seed must be an int in \[0, 2\*\*63 - 1"),
        (lambda: grass_ops.random_mask(5, 6), ValueError, "k must be <= d"),
        (lambda: grass_ops.random_mask(0, 1), ValueError, r"d must be an int in \[1, .*got 0"),
        (lambda: grass_ops.random_mask(5, 2.5), TypeError, "k must be an int, got float 2.5"),
        (lambda: grass_ops.random_mask(5, True), TypeError, "k must be an int, got bool True"),
        (lambda: grass_ops.random_mask(5, 2**64), ValueError, r"k must be an int in \[1, 2\*\*63 - 1"),
        (lambda: grass_ops.random_mask(5, 2, seed=-1), ValueError, r"seed must be an int in \[0, "),
    ],
)
def test_hash_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_hash_bounds_are_exact_for_large_k():
    """Block bounds r * k // s in exact integers (no uint64 overflow for k near 2**63)."""
    idx, _ = grass_ops.sjlt_hash(50, 2**63 - 1, 3, seed=1)
    width = (2**63 - 1) // 3
    assert all(r * width <= v < (r + 1) * width + 2 for row in idx.tolist() for r, v in enumerate(row))


def test_dense_sign_stream_pinned_values():
    """Rademacher's matrix and FJLT's diagonal come from the named stream STREAM_DENSE_SIGNS (= 5): the
    projections are a pure function of (shapes, seed) and must never change."""
    assert C.Rademacher(8, 2, seed=3).matrix.sign().int().tolist() == [[-1, -1, 1, 1, 1, 1, -1, -1], [-1, -1, 1, -1, 1, 1, -1, -1]]
    fjlt = C.FJLT(6, 4, seed=1)
    assert fjlt.signs.int().tolist() == [1, -1, -1, -1, -1, -1] and fjlt.rows.tolist() == [2, 3, 4, 5]
    assert grass_ops.derive_seed(7, 1) == grass_ops.derive_seed(7, 1) != grass_ops.derive_seed(7, 2)
