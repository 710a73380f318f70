"""attribution.checkpoints: checkpoints swapped into the model by reference (no copy of the weights), the
model's own tensors given back bit for bit, buffers and tied weights, and the copying fallback."""
import pytest
import torch
from attribution_problems import loss_fn, make_problem
from torch import nn

from attribution import Attributor
from attribution.checkpoints import Checkpoints, WeightSwap


def scaled(state: dict, factor: float) -> dict:
    return {k: v * factor for k, v in state.items()}


def pointers(model: nn.Module) -> list[int]:
    return [p.data_ptr() for p in model.parameters()]


def test_checkpoints_are_swapped_in_by_reference_and_the_models_own_tensors_come_back():
    model, _, _ = make_problem()
    model.train()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    before = pointers(model)
    first, lazy = scaled(own, 0.5), scaled(own, -2.0)
    checkpoints = Checkpoints(model, [first, None, lambda: lazy], None, "tracin")
    seen = []
    with checkpoints.each() as indices:
        for c in indices:
            assert not model.training
            state = model.state_dict()
            expected = [first, own, lazy][c]
            assert all(torch.equal(state[k], expected[k]) for k in expected)
            seen.append([p.data_ptr() for p in model.parameters()])
    assert seen[0] == [first[k].data_ptr() for k in first]  # by reference: no copy of the checkpoint
    assert seen[1] == before and seen[2] == [lazy[k].data_ptr() for k in lazy]
    assert pointers(model) == before and model.training  # the very tensors, untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())


def test_a_checkpoint_of_another_dtype_is_converted_and_the_model_keeps_its_dtype():
    model, _, _ = make_problem()
    single = {k: v.float() * 3 for k, v in model.state_dict().items()}  # float32 into a float64 model
    with Checkpoints(model, [single], None, "tracin").each() as indices:
        for _ in indices:
            assert all(p.dtype == torch.float64 for p in model.parameters())
            assert all(torch.equal(model.state_dict()[k], v.double()) for k, v in single.items())
    assert all(p.dtype == torch.float64 for p in model.parameters())


class TiedNorm(nn.Module):
    """Two linear layers sharing one weight, and a batch norm (buffers in the state dict)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_tied_weights_and_buffers_follow_each_checkpoint_and_are_restored():
    torch.manual_seed(0)
    model = TiedNorm()
    model.train()
    model(torch.randn(8, 4))  # running statistics away from their initial values
    own = {k: v.clone() for k, v in model.state_dict().items()}
    other = scaled(own, 2.0)
    other["b.weight"] = other["a.weight"]
    other["norm.num_batches_tracked"] = own["norm.num_batches_tracked"] + 5
    assert WeightSwap.fits(model)
    with Checkpoints(model, [other, None], None, "tracin").each() as indices:
        for c in indices:
            expected = [other, own][c]
            assert model.a.weight is model.b.weight
            assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())


class Renamed(nn.Module):
    """A state dict that names a parameter otherwise than named_parameters (as custom state-dict hooks do)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 2)
        self._register_state_dict_hook(self._rename)
        self._register_load_state_dict_pre_hook(self._unrename)

    @staticmethod
    def _rename(module, state, prefix, local_metadata):
        for key in [k for k in state if k.startswith(prefix + "inner.")]:
            state[key.replace("inner.", "outer.")] = state.pop(key)

    @staticmethod
    def _unrename(state, prefix, *args):
        for key in [k for k in state if k.startswith(prefix + "outer.")]:
            state[key.replace("outer.", "inner.")] = state.pop(key)


def test_parameters_the_state_dict_does_not_name_fall_back_to_copying():
    model = Renamed()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(own) == {"outer.weight", "outer.bias"} and not WeightSwap.fits(model)
    other = scaled(own, -1.0)
    before = pointers(model)
    with Checkpoints(model, [other, None], None, "tracin").each() as indices:
        for c in indices:
            assert all(torch.equal(model.state_dict()[k], v) for k, v in [other, own][c].items())
            assert pointers(model) == before  # copied in, as WeightCopy does
    assert pointers(model) == before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())


def test_an_error_inside_the_swapping_still_gives_the_model_its_own_weights_back():
    model, _, _ = make_problem()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="stop"):
        with Checkpoints(model, [scaled(own, 4.0), None], None, "tracin").each() as indices:
            next(indices)
            raise RuntimeError("stop")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())


def test_compiled_and_eager_scores_agree_across_swapped_checkpoints(monkeypatch):
    model, train, test = make_problem(torch.float32)
    states = [scaled(model.state_dict(), 0.5), None, scaled(model.state_dict(), 1.5)]
    kept = [None if s is None else {k: v.clone() for k, v in s.items()} for s in states]
    kwargs = dict(method="tracin", compressor="sjlt", k=16, progress=False, checkpoints=states)
    eager = Attributor(model, loss_fn, compile=False, **kwargs).cache(train).attribute(test)
    attr = Attributor(model, loss_fn, compile=True, **kwargs).cache(train)
    compiled = attr.attribute(test)
    assert attr.gradients.stats["compiled"]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(WeightSwap, "fits", staticmethod(lambda model: False))  # the copying path, as before
    copied = Attributor(model, loss_fn, compile=False, **kwargs).cache(train).attribute(test)
    assert torch.equal(copied, eager)
    assert all(s is None or all(torch.equal(v, k[n]) for n, v in s.items()) for s, k in zip(states, kept))


def test_a_lazy_checkpoint_is_read_while_the_model_holds_its_own_weights_alone():
    """Two lazy checkpoints in a row: the first one's tensors are let go before the second is read (the model's
    own weights and one checkpoint at a time)."""
    model, _, _ = make_problem()
    own = pointers(model)
    seen = []

    def loader(factor):
        def read():
            seen.append(pointers(model) == own)
            return scaled(dict(model.named_parameters()), factor)
        return read

    with Checkpoints(model, [loader(2.0), loader(3.0)], None, "tracin").each() as indices:
        for c in indices:
            assert pointers(model) != own
    assert seen and all(seen)


class Subclassed(nn.Parameter):
    pass


class LoadsItsOwnWay(nn.Linear):
    def _load_from_state_dict(self, *args, **kwargs):
        return super()._load_from_state_dict(*args, **kwargs)


def _with_extra_key():
    model = nn.Linear(3, 2)
    model.register_buffer("scale", torch.ones(2))
    model._register_state_dict_hook(lambda module, state, prefix, meta: state.update({prefix + "quant": torch.zeros(1)}))
    return model


@pytest.mark.parametrize("odd", ["subclass", "pre-hook", "own load", "extra key"])
def test_models_that_state_dicts_do_not_describe_plainly_are_copied_into(odd):
    model = {"subclass": lambda: nn.Linear(3, 2), "pre-hook": lambda: nn.Linear(3, 2),
             "own load": lambda: LoadsItsOwnWay(3, 2), "extra key": _with_extra_key}[odd]()
    if odd == "subclass":
        model.weight = Subclassed(model.weight.detach().clone())
    if odd == "pre-hook":
        model._register_load_state_dict_pre_hook(lambda *args: None)
    assert WeightSwap.fits(nn.Linear(3, 2)) and not WeightSwap.fits(model)


def test_inference_and_strided_checkpoint_tensors_are_laid_out_as_the_parameters():
    model, train, test = make_problem()
    with torch.inference_mode():
        inference = scaled(model.state_dict(), 0.5)
    transposed = {k: v.t().contiguous().t() if v.dim() == 2 else v.clone() for k, v in scaled(model.state_dict(), 0.5).items()}
    strides = [p.stride() for p in model.parameters()]
    kwargs = dict(method="tracin", compressor="sjlt", k=8, progress=False, compile=False, dtype=torch.float64)
    want = Attributor(model, loss_fn, checkpoints=[scaled(model.state_dict(), 0.5)], **kwargs).cache(train).attribute(test)
    for state in (inference, transposed):
        with Checkpoints(model, [state], None, "tracin").each() as indices:
            for _ in indices:
                assert [p.stride() for p in model.parameters()] == strides
                assert not any(p.is_inference() for p in model.parameters())
        got = Attributor(model, loss_fn, checkpoints=[state], **kwargs).cache(train).attribute(test)
        assert torch.equal(got, want)
