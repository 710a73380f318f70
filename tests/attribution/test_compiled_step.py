"""The compiled cache step in ordinary use: many Attributors per process, short last batches,
graph breaks and compiler failures (eager fallback with one warning, never an exception)."""
import warnings

import pytest
import torch
from attribution_problems import loss_fn, make_problem

import attribution.compiled
from attribution import Attributor


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_twenty_compiled_attributors_on_one_model_with_a_short_last_batch():
    model, train, test = make_problem(torch.float32, n_train=45, batch=16)  # batches of 16, 16 and 13 rows
    eager = Attributor(model, loss_fn, compressor="factgrass", k=32, compile=False, progress=False).cache(train)
    expected = eager.attribute(test)
    specs = ["factgrass", "sjlt", "logra", "grass", "factgrass:blowup=4"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(20):
            attr = Attributor(model, loss_fn, compressor=specs[i % len(specs)], k=32, compile=True, progress=False)
            scores = attr.cache(train).attribute(test)
            assert attr.stats["compiled"] and attr.stats["fallback"] is None
            assert attr.stats["graphs"] <= 2  # one graph for every batch size (16, 13 and the 6 queries)
            if i % len(specs) == 0:
                torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    bad = [str(w.message) for w in caught if "torch.compile failed" in str(w.message) or "graph breaks" in str(w.message)]
    assert not bad, bad[:3]


def test_batch_sizes_share_one_graph_and_batch_dependent_losses_stay_exact():
    model, train, _ = make_problem(torch.float64, n_train=21, batch=8)  # 8, 8, 5
    mean_loss = lambda m, b: loss_fn(m, b) / b[0].shape[0]  # noqa: E731  (depends on the batch size)
    kwargs = dict(compressor="identity", k=10**6, dtype=torch.float64, progress=False)
    eager = Attributor(model, mean_loss, compile=False, **kwargs)
    compiled = Attributor(model, mean_loss, compile=True, **kwargs)
    for batch in train + [(train[0][0][:1], train[0][1][:1])]:
        g_eager, v_eager = eager.compress_batch(batch)
        g_comp, v_comp = compiled.compress_batch(batch)
        torch.testing.assert_close(g_comp, g_eager, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v_comp, v_eager, rtol=1e-10, atol=1e-12)
    assert compiled.compress.stats()["graphs"] <= 2  # 8 and 5 rows share a graph; one row may specialize


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(attribution.compiled.torch, "compile", broken_compile)
    model, train, test = make_problem(torch.float64)
    reference = Attributor(model, loss_fn, compressor="identity", k=10**6, dtype=torch.float64, compile=False,
                           progress=False).cache(train).attribute(test)
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, dtype=torch.float64, compile=True, progress=False)
    with pytest.warns(UserWarning, match="torch.compile failed .*inductor exploded") as record:
        scores = attr.cache(train).attribute(test)
    assert len([w for w in record if "torch.compile failed" in str(w.message)]) == 1
    assert "inductor exploded" in attr.stats["fallback"]
    torch.testing.assert_close(scores, reference, rtol=0, atol=0)


def test_the_callers_own_errors_still_raise_under_compile():
    model, train, _ = make_problem(torch.float32)
    attr = Attributor(model, lambda m, b: loss_fn(m, b).mean(), compressor="sjlt", k=8, compile=True, progress=False)
    with pytest.raises(ValueError, match=r"shape \[B\] = \[16\]"):
        attr.cache(train)
