"""The language-model LDS setup: offline text, a causal transformer, and K-FAC / EK-FAC on its token sequences."""
import pytest
import torch
from attribution_problems import dense_factors, kronecker_closed_form

from attribution import Attributor
from attribution.evaluation.lm_lds import CharData, LMConfig, batches, block_layers, heldout_output, make_model, sequence_loss, train_lm

TINY = LMConfig(length=8, d_model=8, layers=1, heads=2, n_train=12, n_test=3, epochs=1, batch=4)


def test_sequences_are_seeded_disjoint_windows_of_the_documentation():
    data, again = CharData(TINY), CharData(TINY)
    assert torch.equal(data.train, again.train) and torch.equal(data.test, again.test)
    assert data.train.shape == (12, 9) and data.test.shape == (3, 9) and len(data.vocab) > 50
    rows = {tuple(r.tolist()) for r in data.train} | {tuple(r.tolist()) for r in data.test}
    assert len(rows) == 15  # no sequence is both a training and a held-out one
    text = "".join(data.vocab[i] for i in data.train[0].tolist())
    from attribution.evaluation.lm_lds import corpus_text

    assert text in corpus_text()


@pytest.fixture
def one_thread():
    """Tiny models: one thread (two OpenMP threads measured 10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_lowers_the_heldout_loss_and_is_deterministic(one_thread):
    config = LMConfig(length=8, d_model=16, layers=1, heads=2, n_train=24, n_test=8, epochs=8, batch=8, lr=1e-2)
    data = CharData(config)
    untrained = heldout_output(make_model(len(data.vocab), config), data)
    model = train_lm(data, config, torch.arange(24), seed=5)
    assert float(heldout_output(model, data).mean()) > float(untrained.mean()) + 0.5  # minus the loss: higher is better
    again = train_lm(data, config, torch.arange(24), seed=5)
    torch.testing.assert_close(heldout_output(again, data), heldout_output(model, data), rtol=0, atol=0)
    other_order = train_lm(data, config, torch.arange(24), seed=6)
    assert not torch.equal(heldout_output(other_order, data), heldout_output(model, data))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_influence_on_the_transformer_equals_the_dense_formula(kind, one_thread):
    data = CharData(TINY)
    model = make_model(len(data.vocab), TINY).double()
    layers = block_layers(model)
    assert layers == ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc", "blocks.0.out"]
    attr = Attributor(model, sequence_loss, compressor="identity", k=10**6, dtype=torch.float64, compile=False,
                      progress=False, layers=layers, preconditioner=kind, damping="0.1*mean")
    scores = attr.cache(batches(data.train, 5)).attribute(batches(data.test, 2))
    modules = [dict(model.named_modules())[n] for n in layers]
    expected = kronecker_closed_form(dense_factors(model, [data.train], modules, sequence_loss),
                                     dense_factors(model, [data.test], modules, sequence_loss), "0.1*mean", kind)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-8)
