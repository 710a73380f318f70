"""grass_ops._checks: cached value checks (version counter, inference tensors, CUDA-graph capture),
the int checks of every public size argument."""
import pytest
import torch

import grass_ops
from grass_ops import _checks
from grass_ops.testing import reference_sjlt


def test_validation_cache_sees_in_place_changes():
    idx, sign = grass_ops.sjlt_hash(10, 4, 1, 0)
    x = torch.randn(2, 10)
    grass_ops.sjlt(x, idx, sign, 4)  # validated and cached
    idx[3, 0] = 7  # in-place edit bumps the version counter
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, k=4\)"):
        grass_ops.sjlt(x, idx, sign, 4)


def test_raw_ops_under_inference_mode_still_validate():
    x, y = torch.randn(3, 10), torch.randn(3, 4)
    x_in, g_out = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    expected_sjlt = grass_ops.sjlt(x, *grass_ops.sjlt_hash(10, 4, 2, 0), 4)
    expected_transpose = grass_ops.sjlt_transpose(y, *grass_ops.sjlt_hash(10, 4, 2, 0))
    masks = (grass_ops.random_mask(6, 3, 0), grass_ops.random_mask(5, 2, 1), *grass_ops.sjlt_hash(6, 4, 1, 2))
    expected_factgrass = grass_ops.factgrass(x_in, g_out, *masks, 4)
    with torch.inference_mode():
        idx, sign = grass_ops.sjlt_hash(10, 4, 2, 0)
        torch.testing.assert_close(torch.ops.grass.sjlt(x, idx, sign, 4), expected_sjlt)
        torch.testing.assert_close(grass_ops.sjlt_transpose(y, idx, sign), expected_transpose)
        idx[0, 0] = 9  # inference tensors are mutable in inference mode, without a version bump
        with pytest.raises(ValueError, match=r"idx values must lie in \[0, k=4\)"):
            grass_ops.sjlt(x, idx, sign, 4)
        in_idx, out_idx, fidx, fsign = (t.clone() for t in masks)
        torch.testing.assert_close(grass_ops.factgrass(x_in, g_out, in_idx, out_idx, fidx, fsign, 4), expected_factgrass)
        a, _ = grass_ops.factorized_mask(x_in, g_out, in_idx, out_idx)
        torch.testing.assert_close(a, x_in[..., masks[0]])
        in_idx[0] = 7
        with pytest.raises(ValueError, match=r"in_mask values must lie in \[0, 6\)"):
            grass_ops.factorized_mask(x_in, g_out, in_idx, out_idx)


def test_edits_the_version_counter_cannot_see_are_unsupported_until_clear_caches():
    """Documented behaviour: an edit through .data or a numpy view is not seen (the hash as validated is
    reused); grass_ops.clear_caches() makes the next call read the tensors again."""
    idx, sign = grass_ops.sjlt_hash(10, 4, 1, 0)
    x = torch.randn(3, 10, dtype=torch.float64)
    before = grass_ops.sjlt(x, idx, sign, 4)
    idx.data[2, 0] = (idx[2, 0] + 1) % 4
    assert torch.equal(grass_ops.sjlt(x, idx, sign, 4), before)  # stale: the documented limitation
    grass_ops.clear_caches()
    after = grass_ops.sjlt(x, idx, sign, 4)
    torch.testing.assert_close(after, reference_sjlt(x, idx, sign, 4))
    assert not torch.equal(after, before)
    idx.numpy()[2, 0] = 99
    grass_ops.clear_caches()
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, k=4\)"):
        grass_ops.sjlt(x, idx, sign, 4)
    idx.detach()[2, 0] = 98  # a detached view shares the version counter: seen without clearing
    with pytest.raises(ValueError, match=r"got values in \[\d+, 98\]"):
        grass_ops.sjlt(x, idx, sign, 4)


def test_nothing_computed_during_cuda_graph_capture_is_cached(monkeypatch):
    """During capture the value check cannot read the data (it is skipped) and tables are allocated in
    the graph's pool: neither may be reused afterwards. Simulated: capture is reported for the call."""
    idx, sign = grass_ops.sjlt_hash(10, 4, 1, 0)
    bad = idx.clone()
    bad[0, 0] = 9
    monkeypatch.setattr(_checks, "stream_capturing", lambda *tensors: True)
    monkeypatch.setattr(_checks, "values_readable", lambda t: False)
    _checks.check_sjlt_values_cached(bad, sign, 4)  # skipped: cannot read during capture
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, k=4\)"):  # checked now, not taken as passed
        _checks.check_sjlt_values_cached(bad, sign, 4)
    _checks.check_sjlt_values_cached(idx, sign, 4)  # an eager result is cached and reused during capture
    monkeypatch.setattr(_checks, "stream_capturing", lambda *tensors: True)
    calls = []
    assert _checks.validation_cache.get((idx, sign), ("values", 4), lambda: calls.append(1)) is None and not calls


@pytest.mark.parametrize("value, error, match", [
    (3, None, None), (True, TypeError, "n must be an int, got bool True"), (2.0, TypeError, "n must be an int, got float"),
    (0, ValueError, r"n must be an int in \[1, "), (2**63, ValueError, r"\(int64\)\], got 9223372036854775808"),
    ("3", TypeError, "n must be an int, got str"),
])
def test_check_int(value, error, match):
    if error is None:
        assert _checks.check_int("n", value) == value
    else:
        with pytest.raises(error, match=match):
            _checks.check_int("n", value)


def test_validation_cache_holds_every_layer_of_a_large_model():
    """A step over 600 layers' hashes validates each once: FIFO eviction under a too-small bound would
    recompute every entry at every step."""
    cache = _checks.IdentityCache()
    hashes = [grass_ops.sjlt_hash(16, 4, 1, seed) for seed in range(600)]
    calls = []
    for _ in range(2):
        for idx, sign in hashes:
            cache.get((idx, sign), 4, lambda: calls.append(1))
    assert len(calls) == 600


def _consistent(cache) -> bool:
    return cache.bytes == sum(entry[2] for entry in cache.entries.values())


def test_validation_cache_keeps_what_fits_its_byte_budget():
    """Tables beyond the byte budget are computed and not kept (a cyclic step keeps reusing those that fit);
    validation results, which hold no bytes, are kept whatever the tables hold."""
    cache = _checks.IdentityCache(capacity=100, max_bytes=1000)
    keys = [torch.zeros(1) for _ in range(6)]
    table = lambda: torch.zeros(100, dtype=torch.int16)  # noqa: E731  (200 bytes)
    for key in keys[:5]:
        cache.get((key,), "table", table)
    assert cache.bytes == 1000 and len(cache.entries) == 5
    calls = []
    for _ in range(2):  # over the budget: computed at every call, never kept
        assert cache.get((keys[5],), "table", lambda: calls.append(1) or table()).numel() == 100
    assert calls == [1, 1] and cache.bytes == 1000 and len(cache.entries) == 5
    cache.get((keys[0],), "table", lambda: calls.append(2))  # a kept table is still reused
    cache.get((keys[5],), "check", lambda: calls.append(3))  # a validation is kept with the budget full
    cache.get((keys[5],), "check", lambda: calls.append(4))
    assert calls == [1, 1, 3] and len(cache.entries) == 6 and _consistent(cache)
    cache.clear()
    assert cache.bytes == 0 and not cache.entries


def test_validation_cache_forgets_freed_tensors_and_their_tables():
    cache = _checks.IdentityCache(max_bytes=1000)
    key, other = torch.zeros(1), torch.zeros(1)
    cache.get((key, other), "table", lambda: torch.zeros(200))  # 800 bytes
    assert cache.bytes == 800
    del key  # the entry goes (its table with it) at the next use of the cache
    cache.get((other,), "table", lambda: torch.zeros(100))
    assert len(cache.entries) == 1 and cache.bytes == 400 and _consistent(cache)


def test_validation_cache_survives_a_compute_that_uses_it():
    """A result built from another cached result (the CUDA CSR table from the bucket table), and a compute that
    fills the same key, leave one entry and consistent byte counts."""
    cache = _checks.IdentityCache(capacity=2)
    key = torch.zeros(1)
    inner = lambda: torch.zeros(10)  # noqa: E731
    value = cache.get((key,), "outer", lambda: cache.get((key,), "inner", inner) * 2)
    assert value.shape == (10,) and set(e[1] for e in cache.entries) == {"outer", "inner"} and _consistent(cache)
    again = cache.get((torch.zeros(1),), "same", lambda: cache.get((key,), "outer", inner))
    assert again.shape == (10,) and len(cache.entries) <= 2 and _consistent(cache)
    same = torch.zeros(1)
    cache.get((same,), "x", lambda: cache.get((same,), "x", inner))  # compute fills its own key first
    assert sum(1 for k in cache.entries if k[1] == "x") == 1 and _consistent(cache)
