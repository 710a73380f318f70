"""Regional compilation (compile="regional"): one compiled graph serves every decoder block of a Llama, batches
of any size and length; the gradients equal the eager step's; the model is left as it was."""
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

import attribution.regional  # noqa: E402
from attribution import Attributor, llm  # noqa: E402
from attribution.layers import find_layers  # noqa: E402
from attribution.regional import RegionalCompile, repeated_blocks  # noqa: E402

TEXTS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
         "python list data", "the function creates a list", "data for the loop"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(tiny_llama, layers: int = 3, dtype=torch.float64):
    """The tiny Llama with ``layers`` decoder blocks (the fixture's 2, repeated), in ``dtype``."""
    model, tok = llm.load_model(tiny_llama)
    blocks = model.model.layers
    while len(blocks) < layers:
        blocks.append(type(blocks[0])(model.config, len(blocks)))
    model.config.num_hidden_layers = len(blocks)
    return model.to(dtype).eval(), tok


def _batches(tok, sizes=(3, 1, 2)):
    """Batches of ``sizes`` documents each (lengths differ: each is padded to its longest)."""
    docs = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    out, start = [], 0
    for size in sizes:
        out += llm.document_batches(tok, docs[start:start + size], size, 8)[0]
        start += size
    return out


def test_one_graph_serves_every_block_and_batch_and_equals_the_eager_step(tiny_llama):
    model, tok = _model(tiny_llama)
    batches = _batches(tok)
    kwargs = dict(compressor="factgrass:blowup=4", k=16, layers=["model.layers.*"], dtype=torch.float64, progress=False)
    eager = Attributor(model, llm.sequence_loss, compile=False, **kwargs)
    regional = Attributor(model, llm.sequence_loss, compile="regional", **kwargs)
    assert regional.compress.regional is not None and len(regional.compress.regional.blocks) == 3
    for batch in batches:  # 3, 1 and 2 rows, two lengths
        g_eager, v_eager = eager.compress_batch(batch)
        g_regional, v_regional = regional.compress_batch(batch)
        # inductor's float64 kernels round differently from eager (the whole-step compile too: ~1e-7 of the largest)
        torch.testing.assert_close(g_regional, g_eager, rtol=1e-5, atol=1e-6 * float(g_eager.abs().max()))
        torch.testing.assert_close(v_regional, v_eager, rtol=1e-7, atol=1e-9)
    stats = regional.compress.stats()
    assert stats["compiled"] and stats["fallback"] is None and stats["compile_seconds"] > 0
    assert stats["graphs"] <= 2, stats  # one graph for 3 blocks and every batch (a batch of one row may specialize)
    # the model is left as it was: no compiled call installed, its key-value cache setting back
    assert all(block._compiled_call_impl is None for block in model.model.layers)
    assert model.config.use_cache is True
    assert all(p.requires_grad for p in model.parameters())


def test_many_regional_attributors_in_one_process_and_one_model(tiny_llama):
    """Each compiles its own copy of the block's code (its own recompile budget), and the scores agree."""
    model, tok = _model(tiny_llama, dtype=torch.float32)
    batches = _batches(tok, (3, 3))
    kwargs = dict(compressor="factgrass", k=16, layers=["model.layers.*"], progress=False)
    expected = Attributor(model, llm.sequence_loss, compile=False, **kwargs).cache(batches).attribute(batches[:1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            attr = Attributor(model, llm.sequence_loss, compile="regional", **kwargs)
            scores = attr.cache(batches).attribute(batches[:1])
            torch.testing.assert_close(scores, expected, rtol=1e-3, atol=1e-4)
            assert attr.stats["compiled"] and attr.stats["fallback"] is None and attr.stats["graphs"] <= 2
    # a recompile limit hit raises inside the regional step (regional_compile_config) and would warn here
    assert not [w for w in caught if "torch.compile" in str(w.message)]


def test_an_error_inside_the_step_leaves_the_model_as_it_was(tiny_llama):
    """A loss that raises mid-forward: the blocks' compiled calls, the key-value cache flag, the hooks and the
    capture's slots are all gone afterwards, and the next batch runs."""
    model, tok = _model(tiny_llama)
    batches = _batches(tok, (3, 2))
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) == 3:  # the shape pass and the first step pass; the second step raises
            raise ValueError("a broken loss")
        return llm.sequence_loss(model, batch)

    hooks = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    attr = Attributor(model, loss, k=16, layers=["model.layers.*"], compile="regional", dtype=torch.float64,
                      progress=False)
    attr.compress_batch(batches[0])
    with pytest.raises(ValueError, match="a broken loss"):
        attr.compress_batch(batches[0])
    assert all(block._compiled_call_impl is None for block in model.model.layers)
    assert model.config.use_cache is True
    assert not any(key.startswith("_grass_capture_slot") for m in model.modules() for key in vars(m))
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks
    assert not attr.compress.capture.armed
    assert attr.compress_batch(batches[1])[0].shape[0] == 2


def test_blocks_are_the_repeated_children_that_hold_target_layers(tiny_llama):
    model, _ = _model(tiny_llama)
    blocks = repeated_blocks(model, find_layers(model, ["model.layers.*"]))
    assert blocks == list(model.model.layers)
    assert repeated_blocks(model, find_layers(model, ["model.layers.0.*"])) == []  # one block: nothing repeats
    with pytest.raises(ValueError, match="at least 2 repeated blocks"):
        RegionalCompile(model, blocks[:1])


def test_where_it_does_not_apply_the_whole_step_is_compiled_with_a_warning(tiny_llama):
    model, _ = _model(tiny_llama)
    with pytest.warns(UserWarning, match=r"compile='regional' is not available here \(no 2 repeated blocks"):
        attr = Attributor(model, llm.sequence_loss, k=16, layers=["model.layers.0.*"], compile="regional",
                          dtype=torch.float64, progress=False)
    assert attr.compress.regional is None and attr.compress.compile
    with pytest.warns(UserWarning, match="other-parameter blocks"):
        attr = Attributor(model, llm.sequence_loss, k=16, layers=["model.layers.*"], params=["model.norm.weight"],
                          compile="regional", dtype=torch.float64, progress=False)
    assert attr.compress.regional is None
    with pytest.raises(ValueError, match="compile must be True .*'regional'.* or False, got 'blocks'"):
        Attributor(model, llm.sequence_loss, k=16, compile="blocks", progress=False)


def test_a_compiler_failure_runs_the_blocks_eagerly_with_one_warning(tiny_llama, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(attribution.regional.torch, "compile", broken)
    model, tok = _model(tiny_llama)
    batches = _batches(tok, (3, 2))
    kwargs = dict(k=16, layers=["model.layers.*"], dtype=torch.float64, progress=False)
    eager = Attributor(model, llm.sequence_loss, compile=False, **kwargs)
    with pytest.warns(UserWarning, match="torch.compile of the repeated blocks failed"):
        regional = Attributor(model, llm.sequence_loss, compile="regional", **kwargs)
        first = regional.compress_batch(batches[0])[0]
    torch.testing.assert_close(first, eager.compress_batch(batches[0])[0])
    torch.testing.assert_close(regional.compress_batch(batches[1])[0], eager.compress_batch(batches[1])[0])
    assert regional.compress.stats()["fallback"].startswith("RuntimeError: inductor exploded")
