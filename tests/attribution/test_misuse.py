"""An adversary's findings, each pinned: what used to be silently wrong or an obscure crash is now
exact or a clear error naming the problem."""
import json
import shutil

import pytest
import torch
from attribution_problems import dense_grads, loss_fn, make_problem
from torch import nn

from attribution import Attributor, CorruptStoreError
from attribution import store as store_module
from attribution.capture import LayoutError

EXACT = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False, damping=1e-2)
FAST = dict(compressor="sjlt", k=16, compile=False, progress=False)


# ---- silently wrong before -------------------------------------------------------------------------
class SequenceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):  # x [B, T, 5] -> the first layer sees [T, B, 5]
        return self.l2(torch.tanh(self.l1(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize("tokens", [6, 4])  # T == B (shapes alone cannot tell) and T != B
def test_sequence_first_layers_are_refused(tokens):
    model = SequenceFirst().double()
    x, y = torch.randn(6, tokens, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    attr = Attributor(model, loss_fn, layers=["l1"], **EXACT)
    with pytest.raises(LayoutError, match="layer l1 was called with input .*keep the samples along dim 0"):
        attr.cache([(x, y)])


@pytest.mark.parametrize("second", ["live", "none"])
def test_checkpoints_aliasing_the_live_model_are_snapshotted(second):
    model, train, test = make_problem()
    first = {k: v.clone() * 0.5 for k, v in model.state_dict().items()}
    own = {k: v.clone() for k, v in model.state_dict().items()}
    states = [first, model.state_dict() if second == "live" else None]
    scores = Attributor(model, loss_fn, method="tracin", checkpoints=states, **EXACT).cache(train).attribute(test)
    expected = 0
    for state in (first, own):
        model.load_state_dict(state)
        g, q = dense_grads(model, train), dense_grads(model, test)
        expected = expected + sum(qi @ gi.T for gi, qi in zip(g, q))
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)


class Shuffling:
    """A loader that yields its batches in a new order at every pass (rotated by one more each time)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        r = self.passes % len(self.batches)
        return iter(self.batches[r:] + self.batches[:r])


def test_loaders_that_change_order_between_checkpoints_are_refused():
    model, train, test = make_problem()
    states = [model.state_dict(), {k: v * 0.9 for k, v in model.state_dict().items()}]
    attr = Attributor(model, loss_fn, method="tracin", checkpoints=states, **EXACT)
    with pytest.raises(ValueError, match="different batches for different checkpoints"):
        attr.cache(Shuffling(train))
    attr = Attributor(model, loss_fn, method="tracin", checkpoints=states, **EXACT).cache(train)
    with pytest.raises(ValueError, match="different batches for different checkpoints"):
        attr.attribute(Shuffling([test[0], (test[0][0][:2], test[0][1][:2]), (test[0][0][2:], test[0][1][2:])]))


def test_features_from_another_configuration_are_refused():
    model, train, test = make_problem(torch.float32)
    a = Attributor(model, loss_fn, seed=1, **FAST).cache(train)
    b = Attributor(model, loss_fn, seed=2, **FAST).cache(train)
    with pytest.raises(ValueError, match="another configuration or model"):
        b.attribute(features=a.query_features(test))
    trak = Attributor(model, loss_fn, method="trak", output_fn=loss_fn, seed=2, **FAST).cache(train)
    with pytest.raises(ValueError, match="another configuration or model"):
        b.attribute(features=trak.query_features(test))
    with pytest.raises(ValueError, match="not both"):
        b.attribute(test, features=b.query_features(test))


def test_a_model_changed_in_place_is_refused(tmp_path):
    model, train, test = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, store=tmp_path, **FAST)
    bias = model[0].bias.detach().clone()
    with torch.no_grad():
        model[0].bias += 0.1  # trained after the Attributor was built
    with pytest.raises(ValueError, match="model's weights changed since this Attributor was built"):
        attr.cache(train)
    with torch.no_grad():
        model[0].bias.copy_(bias)
    attr.cache(train)
    with torch.no_grad():
        model[2].weight *= 1.01
    with pytest.raises(ValueError, match="model's weights changed"):
        attr.attribute(test)


def test_cache_does_not_launder_an_altered_shard(tmp_path):
    model, train, test = make_problem(torch.float32)
    Attributor(model, loss_fn, method="trak", output_fn=loss_fn, store=tmp_path, **FAST).cache(train)
    meta = tmp_path / "ckpt_000" / "shards" / "00000001" / "meta.json"
    data = json.loads(meta.read_text())
    data["values"][0] += 1.0
    meta.write_text(json.dumps(data))
    complete = (tmp_path / "ckpt_000" / "complete.json").read_bytes()
    attr = Attributor(model, loss_fn, method="trak", output_fn=loss_fn, store=tmp_path, **FAST)
    with pytest.raises(CorruptStoreError, match="meta.json: the shard metadata was altered"):
        attr.cache(train)
    assert (tmp_path / "ckpt_000" / "complete.json").read_bytes() == complete
    with pytest.raises(CorruptStoreError):
        attr.attribute(test)
    shutil.rmtree(meta.parent)  # the remedy the error names
    attr.cache(train)
    assert attr.verify()["ok"]


def test_non_finite_gradients_are_refused(tmp_path):
    model, train, _ = make_problem(torch.float32)
    nan_loss = lambda m, b: loss_fn(m, b) * torch.where(b[1] == 0, float("nan"), 1.0)  # noqa: E731
    with pytest.raises(FloatingPointError, match="not finite"):
        Attributor(model, nan_loss, method="graddot", **FAST).cache(train)
    huge = lambda m, b: loss_fn(m, b) * 1e8  # noqa: E731
    for store in (tmp_path, None):  # on disk and in memory
        with pytest.raises(FloatingPointError, match="overflow float16 storage"):
            Attributor(model, huge, method="graddot", store=store, storage_dtype="float16", **FAST).cache(train)


def test_a_loss_detached_from_the_model_is_refused():
    model, train, _ = make_problem(torch.float32)
    with pytest.raises(ValueError, match="does not depend on the target layers"):
        Attributor(model, lambda m, b: loss_fn(m, b).detach(), **FAST).cache(train)


def test_trak_with_a_true_fisher_is_refused():
    model, _, _ = make_problem(torch.float32)
    with pytest.raises(ValueError, match="fisher must be 'empirical'"):
        Attributor(model, loss_fn, method="trak", output_fn=loss_fn, fisher="true", logits_fn=lambda m, b: m(b[0]), **FAST)


def test_gradcos_self_influence_is_the_diagonal_even_for_zero_rows():
    model, train, _ = make_problem()
    masked = lambda m, b: loss_fn(m, b) * (b[1] != 0)  # noqa: E731  (class-0 samples have zero gradients)
    x, y = train[0]
    attr = Attributor(model, masked, method="gradcos", **EXACT).cache([(x, y)])
    diagonal = torch.diagonal(attr.attribute([(x, y)]))
    torch.testing.assert_close(attr.self_influence(), diagonal)
    assert bool((diagonal[y == 0] == 0).all()) and bool((diagonal[y != 0] > 0.999).all())


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # two modules, one weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_modules_sharing_a_weight_form_one_exact_block():
    torch.manual_seed(0)
    model = Tied().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    attr = Attributor(model, loss_fn, method="graddot", layers=["a", "b"], **{**EXACT, "damping": 0})
    assert attr.block_names == ["a"] and attr.layer_infos["a"].modules == ("a", "b")
    scores = attr.cache([(x, y)]).attribute([(x, y)])
    rows = []
    for i in range(5):
        model.zero_grad()
        loss_fn(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        rows.append(model.a.weight.grad.T.flatten().clone())  # the shared weight's whole gradient
    g = torch.stack(rows)
    torch.testing.assert_close(scores, g @ g.T, rtol=1e-9, atol=1e-10)


def test_a_weight_tied_outside_linear_layers_is_refused_and_params_do_not_overlap_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # a tied LM head
    with pytest.raises(ValueError, match="shared with '0' .*Embedding"):
        Attributor(model, loss_fn, layers=["1"], **FAST)
    mlp, _, _ = make_problem(torch.float32)
    with pytest.raises(ValueError, match=r"params \['0.weight'\] are already attributed"):
        Attributor(mlp, loss_fn, params=["0.weight"], **FAST)


@pytest.mark.parametrize("spec, match", [
    ("factgrass:blowup=-1", "blowup=-1.* positive"), ("factgrass:blowup=0", "positive"),
    ("factgrass:blowup=nan", "positive finite"), ("factgrass:blowup=abc", "positive number"),
    ("factgrass:k_in=0", "k_in=0 .*positive int"), ("factgrass:k_in=2.5", "positive int"),
    ("factgrass:k_in=1000", "k_in=1000 exceeds d_in .* of layer 0"), ("sjlt:s=1.5", "positive int"),
    ("grass:k_prime=-5", "positive int"), ("grass:k_prime=4", "k_prime=4 must be >= k=16"),
    ("logra:k_in=100", "k_in=100 exceeds d_in"), ("sjlt:foo=1", "no option 'foo' .*options: s"),
    ("factgrass:=3", "must be key=value"), ("factgrass:seed=3", "no option 'seed'"),
])
def test_compressor_options_are_checked(spec, match):
    model, _, _ = make_problem(torch.float32)
    with pytest.raises(ValueError, match=match):
        Attributor(model, loss_fn, **{**FAST, "compressor": spec})


# ---- obscure crashes before ------------------------------------------------------------------------
def test_empty_batches_are_named():
    model, train, test = make_problem(torch.float32)
    empty = (train[0][0][:0], train[0][1][:0])
    with pytest.raises(ValueError, match="batch 1 of the train loader holds no samples"):
        Attributor(model, loss_fn, **FAST).cache([train[0], empty])
    attr = Attributor(model, loss_fn, **FAST).cache(train)
    with pytest.raises(ValueError, match="holds no samples"):
        attr.attribute([empty])


def test_a_mixed_dtype_model_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[2].double()
    fn = lambda m, b: nn.functional.cross_entropy(m[2](m[1](m[0](b[0])).double()), b[1], reduction="none")  # noqa: E731
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    scores = Attributor(model, fn, method="graddot", compressor="identity", k=10**6, compile=False,
                        progress=False).cache([(x, y)]).attribute([(x, y)])
    assert scores.shape == (5, 5) and bool(torch.isfinite(scores).all())


def test_argument_types_are_named():
    model, _, _ = make_problem(torch.float32)
    with pytest.raises(TypeError, match="layers must be None, a name or a list"):
        Attributor(model, loss_fn, layers=[0], **FAST)
    with pytest.raises(ValueError, match="callable logits_fn"):
        Attributor(model, loss_fn, fisher="true", logits_fn=3, **FAST)
    with pytest.raises(ValueError, match="callable output_fn"):
        Attributor(model, loss_fn, method="trak", output_fn=3, **FAST)
    with pytest.raises(TypeError, match="store must be None or a directory path"):
        Attributor(model, loss_fn, store="", **FAST)
    Attributor(model, loss_fn, params=["0.bias"], seed=2**63 - 1, **FAST)  # the params blocks' seeds stay in range


def test_bad_checkpoints_are_named():
    model, _, _ = make_problem(torch.float32)
    state = model.state_dict()
    with pytest.raises(TypeError, match=r"checkpoints\[0\] holds non-tensor values"):
        Attributor(model, loss_fn, method="tracin", checkpoints=[{"model": state, "epoch": 1}], **FAST)
    with pytest.raises(TypeError, match=r"checkpoints\[1\] must be a state dict"):
        Attributor(model, loss_fn, method="tracin", checkpoints=[state, "ckpt.pt"], **FAST)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\['0.weight'\] has shape"):
        Attributor(model, loss_fn, method="tracin", checkpoints=[{**state, "0.weight": torch.zeros(3, 3)}], **FAST)


@pytest.mark.parametrize("logits, match", [
    (lambda m, b: m(b[0])[:, 0], "logits .*C >= 2"), (lambda m, b: m(b[0]) * float("nan"), "non-finite logits"),
])
def test_bad_logits_are_named(logits, match):
    model, train, _ = make_problem(torch.float32)
    with pytest.raises((ValueError, FloatingPointError), match=match):
        Attributor(model, loss_fn, fisher="true", logits_fn=logits, **FAST).cache(train)


def test_compile_with_non_tensor_batch_entries_and_a_short_last_batch():
    model, train, test = make_problem(torch.float32, n_train=40)  # 16, 16, 8
    weighted = [(x, y, [1.0] * len(x)) for x, y in train]
    fn = lambda m, b: loss_fn(m, b[:2]) * torch.tensor(b[2])  # noqa: E731
    scores = Attributor(model, fn, method="graddot", compressor="sjlt", k=16, compile=True, progress=False
                        ).cache(weighted).attribute([(*test[0], [1.0] * len(test[0][0]))])
    eager = Attributor(model, fn, method="graddot", compressor="sjlt", k=16, compile=False, progress=False
                       ).cache(weighted).attribute([(*test[0], [1.0] * len(test[0][0]))])
    torch.testing.assert_close(scores, eager, rtol=1e-4, atol=1e-5)


def test_compress_batch_runs_a_train_mode_model_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, compile=False, progress=False)
    one, _ = attr.compress_batch((x[:1], y[:1]))
    all_, _ = attr.compress_batch((x, y))
    torch.testing.assert_close(all_[:1], one)  # per-sample: no batch statistics, no dropout
    assert model.training


def test_malformed_store_files_are_named(tmp_path):
    model, train, test = make_problem(torch.float32)
    Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    done = tmp_path / "ckpt_000" / "fim" / "done.json"
    original = done.read_text()
    done.write_text("[]")
    with pytest.raises(CorruptStoreError, match="done.json: malformed record"):
        Attributor(model, loss_fn, store=tmp_path, **FAST).attribute(test)
    record = json.loads(original)
    del record["files"]["block_001.eigvals.npy"]
    done.write_text(json.dumps(record))
    with pytest.raises(CorruptStoreError, match="done.json: the record of derived data was altered"):
        Attributor(model, loss_fn, store=tmp_path, **FAST).attribute(test)
    done.write_text(json.dumps(store_module._sealed(record)))  # resealed, as a forger would
    with pytest.raises(CorruptStoreError, match="block 1's eigendecomposition is missing"):
        Attributor(model, loss_fn, store=tmp_path, **FAST).attribute(test)
    done.write_text(original)
    manifest = tmp_path / "manifest.json"
    manifest.write_text("[1, 2]")
    with pytest.raises(CorruptStoreError, match="manifest must be a JSON object"):
        Attributor(model, loss_fn, store=tmp_path, **FAST)


def test_a_loss_that_leaves_torch_is_explained():
    model, train, _ = make_problem(torch.float32)
    fn = lambda m, b: torch.from_numpy(loss_fn(m, b).numpy())  # noqa: E731
    with pytest.raises(RuntimeError, match="loss_fn failed while its per-sample gradients were taken"):
        Attributor(model, fn, **FAST).cache(train)
