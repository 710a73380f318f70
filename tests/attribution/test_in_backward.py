"""In-backward compression (capture.sketches, compress.layer_tap) equals compressing captured factors
(the K-FAC path, and the path before it): every compressor, layers called several times, padded
language-model batches, bfloat16 autocast, the compiled step."""
import pytest
import torch
from attribution_problems import loss_fn
from test_capture import SharedBlock

from attribution import llm
from attribution.compression import BatchCompressor, build_compressors
from attribution.layers import find_layers

SPECS = ["factgrass", "factgrass:s=2,blowup=1.5", "logra", "sjlt:s=2", "grass", "random_mask", "gaussian",
         "rademacher", "fjlt", "identity"]


def _both(model, spec, k, dtype=torch.float64, autocast=None, compile=False, layers=None):
    """(in-backward, factor-capture) BatchCompressors with the same compressors."""
    infos = find_layers(model, layers)
    blocks = build_compressors(spec, infos, k, seed=3)
    make = lambda factors, comp: BatchCompressor(model, infos, [], blocks, dtype, torch.device("cpu"),  # noqa: E731
                                                 compile=comp, return_factors=factors, autocast=autocast)
    return make(False, compile), make(True, False)


@pytest.mark.parametrize("spec", SPECS)
def test_every_compressor_on_layers_called_several_times(spec):
    torch.manual_seed(0)
    model = SharedBlock().double()
    in_backward, factors = _both(model, spec, k=16)
    for rows in (1, 3):  # the smallest and an odd-sized batch
        batch = (torch.randn(rows, 4, 5, dtype=torch.float64), torch.randint(0, 3, (rows,)))
        grads, values = in_backward(batch, loss_fn)
        expected, expected_values = factors(batch, loss_fn)
        assert grads.shape == expected.shape == (rows, in_backward.columns)
        torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(values, expected_values, rtol=0, atol=0)


@pytest.fixture(scope="module")
def padded_llama(tiny_llama):
    model, tokenizer = llm.load_model(tiny_llama)
    texts = ("the a for loop", "python list data privacy statement expression creates function", "lambda for",
             "assert python list")
    docs = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    batches, _ = llm.document_batches(tokenizer, docs, batch_size=3, max_length=32)
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches)  # padded rows are part of the check
    return model, batches


@pytest.mark.parametrize("spec", ["factgrass", "logra", "grass"])
def test_padded_language_model_batches(padded_llama, spec):
    model, batches = padded_llama
    in_backward, factors = _both(model, spec, k=64, dtype=torch.float32)
    for batch in batches:
        torch.testing.assert_close(in_backward(batch, llm.sequence_loss)[0], factors(batch, llm.sequence_loss)[0],
                                   rtol=1e-4, atol=1e-6)


def test_bfloat16_autocast_compresses_in_float32(padded_llama):
    """Under autocast both paths see the same bfloat16 factors and compress them in float32."""
    model, batches = padded_llama
    in_backward, factors = _both(model, "factgrass", k=64, dtype=torch.float32, autocast=torch.bfloat16)
    for batch in batches:
        grads, expected = in_backward(batch, llm.sequence_loss)[0], factors(batch, llm.sequence_loss)[0]
        torch.testing.assert_close(grads, expected, rtol=2e-3, atol=1e-5)


def test_compiled_step_equals_eager(padded_llama):
    model, batches = padded_llama
    compiled, factors = _both(model, "factgrass", k=64, dtype=torch.float32, compile=True)
    for batch in batches:
        torch.testing.assert_close(compiled(batch, llm.sequence_loss)[0], factors(batch, llm.sequence_loss)[0],
                                   rtol=1e-4, atol=1e-6)
    stats = compiled.stats()
    assert stats["compiled"] and stats["graph_breaks"] == 0 and stats["fallback"] is None


def test_a_layer_the_forward_pass_skips_is_named():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)).double()
    unused = torch.nn.Linear(3, 3).double()
    model.add_module("unused", unused)  # Sequential calls it: wrap the forward instead
    model.forward = lambda x: model[1](model[0](x))
    in_backward, _ = _both(model, "identity", k=16)
    with pytest.raises(ValueError, match=r"layers \['unused'\] were not called"):
        in_backward((torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])), loss_fn)


def _saved_bytes(step) -> int:
    """Bytes of the tensors autograd saves for the backward while ``step()`` runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total[0]


def test_the_eager_step_saves_no_layer_input_for_a_weight_gradient(padded_llama):
    """Parameters are frozen while the eager step runs: the same gradients, less saved for the backward, and every
    parameter's requires_grad flag restored after (also a frozen one's, and after an error in the loss)."""
    model, batches = padded_llama
    model.lm_head.weight.requires_grad_(False)  # a frozen parameter (as with an adapter) stays frozen
    try:
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        in_backward, _ = _both(model, "factgrass", k=64, dtype=torch.float32)
        batch = batches[0]
        frozen = _saved_bytes(lambda: in_backward(batch, llm.sequence_loss))
        grads = in_backward(batch, llm.sequence_loss)[0]
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        in_backward.capture.freeze = False
        unfrozen = _saved_bytes(lambda: in_backward(batch, llm.sequence_loss))
        torch.testing.assert_close(in_backward(batch, llm.sequence_loss)[0], grads, rtol=0, atol=0)
        assert frozen < 0.8 * unfrozen
        in_backward.capture.freeze = True

        seen = []

        def failing(model, batch):
            if not torch.is_grad_enabled():  # the shape pass (no_grad, one sample)
                return llm.sequence_loss(model, batch)
            seen.append(any(p.requires_grad for p in model.parameters()))
            raise RuntimeError("the loss failed")

        with pytest.raises(RuntimeError, match="the loss failed"):
            in_backward(batch, failing)
        assert seen == [False]  # frozen inside the step
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    finally:
        model.lm_head.weight.requires_grad_(True)


def test_frozen_parameters_leaves_non_leaf_and_inference_tensors_alone():
    from attribution.capture import frozen_parameters

    model = torch.nn.Linear(3, 2)
    base = torch.randn(2, 3, requires_grad=True)
    model._parameters["weight"] = base * 2  # a computed tensor in a parameter's place (a functional swap)
    with torch.inference_mode():
        made = torch.nn.Parameter(torch.zeros(2))
    model._parameters["bias"] = made
    with frozen_parameters(model):
        assert model.weight.requires_grad  # a non-leaf's flag cannot be set: kept as it is
    assert model.weight.requires_grad and model.bias.requires_grad == made.requires_grad
    plain = torch.nn.Linear(3, 2)
    inside = []
    with pytest.raises(ValueError, match="inside"), frozen_parameters(plain):
        inside.extend(p.requires_grad for p in plain.parameters())
        raise ValueError("inside")
    assert inside == [False, False] and all(p.requires_grad for p in plain.parameters())
