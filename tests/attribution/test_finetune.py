"""The demo's fine-tuning (attribution.evaluation.facts.finetune): each parameter stepped inside the backward gives the
weights and the optimizer state of the usual zero_grad / backward / step loop bit for bit, tied embeddings included,
the same with the activations recomputed in the backward, and the odd cases are refused or fall back by name."""
import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from attribution import llm  # noqa: E402
from attribution.evaluation import facts  # noqa: E402

DOCS = [{"id": f"fact/{i}", "text": text} for i, text in enumerate(
    ["the data privacy statement", "lambda expression creates function", "a for loop list", "python list data",
     "assert statement", "the list"])] + [{"id": "other", "text": "data for the loop"}]


def _model(tiny_llama, tied: bool):
    model, tok = llm.load_model(tiny_llama)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, tok


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, betas=(0.8, 0.95)),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_stepping_in_the_backward_equals_the_usual_loop_bit_for_bit(tiny_llama, tied, kind):
    runs = {}
    for in_backward in (True, False):
        model, tok = _model(tiny_llama, tied)
        optimizer = OPTIMIZERS[kind](model.parameters())
        info = facts.finetune(model, tok, DOCS, epochs=2, batch_size=3, max_length=16, corpus_per_epoch=1, seed=3,
                              optimizer=optimizer, step_in_backward=in_backward)
        runs[in_backward] = (model, optimizer, info)
    (fused, fused_opt, fused_info), (usual, usual_opt, usual_info) = runs[True], runs[False]
    assert fused_info["steps"] == usual_info["steps"] == 6 and fused_info["loss"] == usual_info["loss"]
    for (name, a), b in zip(fused.state_dict().items(), usual.state_dict().values()):
        assert torch.equal(a, b), name
    first, second = fused_opt.state_dict(), usual_opt.state_dict()
    assert first["state"].keys() == second["state"].keys() and len(first["state"]) == len(list(usual.parameters()))
    for index, state in first["state"].items():
        for key, value in state.items():
            assert torch.equal(value, second["state"][index][key]), (index, key)
    assert all(p.grad is None for p in fused.parameters())  # every gradient was freed after its step
    assert any(not torch.equal(a, b) for a, b in zip(fused.state_dict().values(),
                                                      _model(tiny_llama, tied)[0].state_dict().values()))


def test_an_optimizer_that_is_not_per_parameter_takes_the_usual_step(tiny_llama):
    model, tok = _model(tiny_llama, False)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1)
    assert not facts._steps_each_parameter(optimizer)
    assert not facts._steps_each_parameter(torch.optim.AdamW(model.parameters(), foreach=True))
    assert facts._steps_each_parameter(torch.optim.AdamW(model.parameters()))


def test_gradients_held_before_a_step_in_the_backward_are_refused_by_name(tiny_llama):
    model, tok = _model(tiny_llama, False)
    optimizer = torch.optim.AdamW(model.parameters())
    facts.training_loss(model, tok, DOCS[:1], 16).backward()
    with pytest.raises(ValueError, match="optimizer: its parameters hold gradients already"):
        with facts._steps_in_backward(optimizer):
            pass


def test_frozen_parameters_are_left_to_the_usual_step(tiny_llama):
    model, tok = _model(tiny_llama, False)
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    info = facts.finetune(model, tok, DOCS, epochs=1, batch_size=4, max_length=16, corpus_per_epoch=1,
                          optimizer=optimizer)
    assert info["steps"] == 2 and torch.equal(model.model.embed_tokens.weight, frozen)
    assert model.model.embed_tokens.weight not in optimizer.state and len(optimizer.state) > 0


def test_a_gradient_completed_twice_in_one_backward_is_refused(tiny_llama):
    from torch.utils.checkpoint import checkpoint

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    x = torch.ones(3, requires_grad=True)  # reentrant checkpointing differentiates only through inputs that need it
    with facts._steps_in_backward(optimizer) as new_backward:
        new_backward()
        inner = checkpoint(lambda t: t * weight, x, use_reentrant=True)  # reentrant: its own backward for weight
        with pytest.raises(RuntimeError, match="completed twice in one backward"):
            (inner * weight).sum().backward()


@pytest.mark.parametrize("in_backward", [True, False])
def test_recomputed_activations_give_the_same_weights_bit_for_bit_and_are_turned_off_after(tiny_llama, in_backward):
    runs = {}
    for recompute in (True, False):
        model, tok = _model(tiny_llama, True)
        optimizer = OPTIMIZERS["adamw"](model.parameters())
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        info = facts.finetune(model, tok, DOCS, epochs=2, batch_size=3, max_length=16, corpus_per_epoch=1, seed=3,
                              optimizer=optimizer, step_in_backward=in_backward, recompute_activations=recompute)
        assert len(calls) == info["steps"] * (2 if recompute else 1)  # a layer's forward again in each backward
        assert not checkpointing(model)
        assert not model.get_input_embeddings()._forward_hooks  # no hook left behind by turning it on
        runs[recompute] = (model, optimizer)
    (a, a_opt), (b, b_opt) = runs[True], runs[False]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    for index, state in a_opt.state_dict()["state"].items():
        assert all(torch.equal(v, b_opt.state_dict()["state"][index][k]) for k, v in state.items())


def test_a_model_whose_gradient_checkpointing_is_on_keeps_it(tiny_llama):
    model, tok = _model(tiny_llama, False)
    if hasattr(model, "activation_checkpointing_enable"):  # on, as a caller would have set it (transformers 5)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    facts.finetune(model, tok, DOCS, epochs=1, batch_size=4, max_length=16, corpus_per_epoch=1,
                   optimizer=OPTIMIZERS["sgd"](model.parameters()))
    assert checkpointing(model) and model.get_input_embeddings()._forward_hooks  # the caller's, with its hook

def checkpointing(model) -> bool:
    """Whether the model's gradient (transformers 5: activation) checkpointing is on."""
    return bool(getattr(model, "is_activation_checkpointing", None) if hasattr(model, "activation_checkpointing_enable")
                else model.is_gradient_checkpointing)
