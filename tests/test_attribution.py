import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from attribution import Attributor
from attribution.metrics import spearman

N_TRAIN, N_TEST = 48, 6


def make_problem(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 4)).to(dtype)
    x = torch.randn(N_TRAIN + N_TEST, 10, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (N_TRAIN + N_TEST,), generator=gen)
    train = [(x[i : i + 16], y[i : i + 16]) for i in range(0, N_TRAIN, 16)]
    test = [(x[N_TRAIN:], y[N_TRAIN:])]
    return model, train, test


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def dense_grads(model, batches, fn=loss_fn):
    """Per-sample weight gradients of fn (default: the loss) for both layers, [n, p_l], flattened as
    W.grad.T (d_in, d_out)."""
    rows = [[], []]
    for x, y in batches:
        for i in range(len(x)):
            model.zero_grad()
            fn(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
            for j, layer in enumerate((model[0], model[2])):
                rows[j].append(layer.weight.grad.T.flatten().clone())
    return [torch.stack(r) for r in rows]


def closed_form(model, train, test, damping, method="if"):
    g_train, g_test = dense_grads(model, train), dense_grads(model, test)
    scores = torch.zeros(N_TEST, N_TRAIN, dtype=torch.float64)
    for g, q in zip(g_train, g_test):
        if method == "if":
            fim = g.T @ g / g.shape[0] + damping * torch.eye(g.shape[1], dtype=torch.float64)
            scores += q @ torch.linalg.solve(fim, g.T)
        else:
            scores += q @ g.T
    return scores, g_train, g_test


@pytest.mark.parametrize("method", ["if", "graddot", "gradcos"])
def test_identity_float64_equals_closed_form(method):
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, method=method, compressor="identity", k=10**6, damping=1e-2,
                      dtype=torch.float64, compile=False, progress=False)
    attr.cache(train)
    scores = attr.attribute(test)
    expected, g_train, g_test = closed_form(model, train, test, 1e-2, method)
    if method == "gradcos":
        g = torch.cat(g_train, 1)
        q = torch.cat(g_test, 1)
        expected = (q @ g.T) / (q.norm(dim=1, keepdim=True) * g.norm(dim=1))
    assert scores.shape == (N_TEST, N_TRAIN) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)


def test_changing_damping_needs_no_new_cache():
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, damping=1e-2, dtype=torch.float64,
                      compile=False, progress=False)
    attr.cache(train)
    attr.damping = 1e-1
    torch.testing.assert_close(attr.attribute(test), closed_form(model, train, test, 1e-1)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("compressor, k", [("factgrass", 128), ("sjlt", 128), ("grass", 128)])
def test_compressed_scores_correlate_with_identity(compressor, k):
    model, train, test = make_problem(torch.float32)
    exact = Attributor(model, loss_fn, compressor="identity", k=10**6, damping=1e-3, compile=False, progress=False)
    exact.cache(train)
    approx = Attributor(model, loss_fn, compressor=compressor, k=k, damping=1e-3, compile=False, progress=False)
    approx.cache(train)
    rho = spearman(approx.attribute(test), exact.attribute(test)).mean()
    assert float(rho) >= 0.9, f"{compressor}: mean Spearman {float(rho):.3f}"


def test_compiled_cache_equals_eager_and_has_no_graph_breaks():
    model, train, test = make_problem(torch.float32)
    eager = Attributor(model, loss_fn, compressor="factgrass", k=32, compile=False, progress=False).cache(train)
    compiled = Attributor(model, loss_fn, compressor="factgrass", k=32, compile=True, progress=False).cache(train)
    assert compiled.stats["compiled"] and compiled.stats["graph_breaks"] == 0
    torch.testing.assert_close(compiled.attribute(test), eager.attribute(test), rtol=1e-4, atol=1e-4)


def _shard_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".npy"):
                path = os.path.join(dirpath, f)
                out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


class _Interrupt(Exception):
    pass


def _interrupting(batches, after):
    for i, b in enumerate(batches):
        if i == after:
            raise _Interrupt()
        yield b


def test_interrupted_cache_resumes_bit_for_bit(tmp_path):
    model, train, test = make_problem(torch.float32)
    kwargs = dict(compressor="factgrass", k=32, seed=3, compile=False, progress=False)
    full = Attributor(model, loss_fn, store=tmp_path / "full", **kwargs).cache(train)
    partial = Attributor(model, loss_fn, store=tmp_path / "resumed", **kwargs)
    with pytest.raises(_Interrupt):
        partial.cache(_interrupting(train, after=2))
    assert len(os.listdir(tmp_path / "resumed" / "ckpt_000" / "shards")) == 2
    resumed = Attributor(model, loss_fn, store=tmp_path / "resumed", **kwargs).cache(train)
    assert _shard_bytes(tmp_path / "full") == _shard_bytes(tmp_path / "resumed")
    torch.testing.assert_close(resumed.attribute(test), full.attribute(test), rtol=0, atol=0)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    from test_attribution import make_problem, loss_fn
    from attribution import Attributor
    model, train, test = make_problem(torch.float32)
    def slow(batches):
        for b in batches:
            yield b
            print("batch", flush=True)
            time.sleep({delay})
    Attributor(model, loss_fn, store={store!r}, compressor="factgrass", k=32, seed=3, compile=False,
               progress=False).cache(slow(train))
    print("done", flush=True)
    """
)


def test_sigkill_mid_cache_loses_no_completed_shard(tmp_path):
    store = str(tmp_path / "killed")
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), delay=30, store=store)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "batch"  # the first shard is written before the loader resumes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = os.listdir(os.path.join(store, "ckpt_000", "shards"))
    assert shards == ["00000000"]
    model, train, test = make_problem(torch.float32)
    kwargs = dict(compressor="factgrass", k=32, seed=3, compile=False, progress=False)
    resumed = Attributor(model, loss_fn, store=store, **kwargs).cache(train)
    fresh = Attributor(model, loss_fn, store=tmp_path / "fresh", **kwargs).cache(train)
    assert _shard_bytes(store) == _shard_bytes(tmp_path / "fresh")
    torch.testing.assert_close(resumed.attribute(test), fresh.attribute(test), rtol=0, atol=0)


def test_store_is_numpy_readable_and_refuses_other_configs(tmp_path):
    model, train, test = make_problem(torch.float32)
    Attributor(model, loss_fn, store=tmp_path, compressor="factgrass", k=32, compile=False, progress=False).cache(train)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["compressors"]["0"]["type"] == "FactGraSS" and manifest["seed"] == 0
    shard = np.load(tmp_path / "ckpt_000" / "shards" / "00000000" / "layer_000.npy", mmap_mode="r")
    assert shard.shape == (16, 32) and shard.dtype == np.float32
    with pytest.raises(ValueError, match="different configuration.*seed"):
        Attributor(model, loss_fn, store=tmp_path, compressor="factgrass", k=32, seed=1, compile=False)
    with pytest.raises(ValueError, match="different configuration"):
        Attributor(model, loss_fn, store=tmp_path, compressor="sjlt", k=32, compile=False)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="model_fingerprints"):
        Attributor(model, loss_fn, store=tmp_path, compressor="factgrass", k=32, compile=False)


def test_same_seed_same_cache_and_half_storage(tmp_path):
    model, train, _ = make_problem(torch.float32)
    for name in ("a", "b"):
        Attributor(model, loss_fn, store=tmp_path / name, compressor="grass", k=32, compile=False, progress=False).cache(train)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    attr = Attributor(model, loss_fn, store=tmp_path / "bf16", compressor="grass", k=32, storage_dtype="bfloat16",
                      compile=False, progress=False).cache(train)
    ref = Attributor(model, loss_fn, compressor="grass", k=32, compile=False, progress=False).cache(train)
    test = [train[0]]
    rho = spearman(attr.attribute(test), ref.attribute(test)).mean()
    assert float(rho) > 0.99


def test_memory_budget_chunks_the_store():
    model, train, test = make_problem(torch.float32)
    big = Attributor(model, loss_fn, compressor="sjlt", k=64, compile=False, progress=False).cache(train)
    small = Attributor(model, loss_fn, compressor="sjlt", k=64, compile=False, progress=False, memory_budget=4 * 140 * 3)
    small.cache(train)
    assert small._row_budget(N_TEST) == 3  # far fewer rows than a 16-row shard
    torch.testing.assert_close(small.attribute(test), big.attribute(test), rtol=1e-4, atol=1e-4)


def test_top_k_and_self_influence():
    model, train, test = make_problem()
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, damping=1e-2, dtype=torch.float64,
                      compile=False, progress=False).cache(train)
    scores = attr.attribute(test)
    values, indices = attr.top_k(test, k=5)
    torch.testing.assert_close(values, scores.topk(5, dim=1).values)
    low_values, _ = attr.top_k(test, k=5, largest=False)
    assert bool((low_values <= values.min(1, keepdim=True).values).all())
    diag = torch.diagonal(attr.attribute(train))
    torch.testing.assert_close(attr.self_influence(), diag, rtol=1e-8, atol=1e-8)


def test_tracin_is_a_weighted_sum_of_checkpoint_graddots():
    model, train, test = make_problem()
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    states.append({k: v.clone() for k, v in model.state_dict().items()})
    kwargs = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False)
    tracin = Attributor(model, loss_fn, method="tracin", checkpoints=states, checkpoint_weights=[0.1, 0.3], **kwargs)
    scores = tracin.cache(train).attribute(test)
    expected = 0
    for state, lr in zip(states, [0.1, 0.3]):
        model.load_state_dict(state)
        expected = expected + lr * Attributor(model, loss_fn, method="graddot", **kwargs).cache(train).attribute(test)
    torch.testing.assert_close(scores, expected)


def test_trak_follows_the_formula():
    model, train, test = make_problem()

    def margin(model, batch):
        x, y = batch
        logits = model(x)
        correct = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    attr = Attributor(model, loss_fn, method="trak", output_fn=margin, compressor="identity", k=10**6,
                      damping=1e-2, dtype=torch.float64, compile=False, progress=False)
    scores = attr.cache(train).attribute(test)
    # manual: features = gradients of the margin
    feats = [dense_grads(model, batches, margin) for batches in (train, test)]
    expected = 0
    for g, q in zip(*feats):
        fim = g.T @ g / g.shape[0] + 1e-2 * torch.eye(g.shape[1], dtype=torch.float64)
        expected = expected + q @ torch.linalg.solve(fim, g.T)
    with torch.no_grad():
        f_train = torch.cat([margin(model, b) for b in train])
    expected = expected * (1 - torch.sigmoid(f_train))[None, :]
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-8)


def test_true_fisher_is_the_expectation_over_classes():
    model, train, test = make_problem()
    logits_fn = lambda m, b: m(b[0])  # noqa: E731
    attr = Attributor(model, loss_fn, compressor="identity", k=10**6, damping=1e-2, dtype=torch.float64,
                      fisher="true", logits_fn=logits_fn, compile=False, progress=False)
    scores = attr.cache(train).attribute(test)
    g_train, g_test = dense_grads(model, train), dense_grads(model, test)
    x = torch.cat([b[0] for b in train])
    probs = torch.softmax(model(x), -1).detach()
    expected = 0
    for j, layer in enumerate((model[0], model[2])):
        fim = 0
        for c in range(4):
            for i in range(N_TRAIN):
                model.zero_grad()
                nn.functional.cross_entropy(model(x[i : i + 1]), torch.tensor([c])).backward()
                g = layer.weight.grad.T.flatten()
                fim = fim + probs[i, c] * torch.outer(g, g)
        fim = fim / N_TRAIN + 1e-2 * torch.eye(g.numel(), dtype=torch.float64)
        expected = expected + g_test[j] @ torch.linalg.solve(fim, g_train[j].T)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-7)


class Conv1D(nn.Module):
    """Same layout as transformers' GPT-2 Conv1D: y = x @ W + b, W [d_in, d_out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_conv1d_layers_and_sequences():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 6), nn.Tanh(), Conv1D(3, 12))
    x = torch.randn(8, 5, 6, dtype=torch.float64)  # [B, T, d]: per-sample loss sums over tokens

    def seq_loss(m, b):
        return m(b).pow(2).sum(dim=(1, 2))

    attr = Attributor(model, seq_loss, method="graddot", compressor="identity", k=10**6, dtype=torch.float64,
                      compile=False, progress=False)
    scores = attr.cache([x]).attribute([x[:2]])
    grads = []
    for i in range(8):
        model.zero_grad()
        seq_loss(model, x[i : i + 1]).sum().backward()
        grads.append(torch.cat([model[0].weight.grad.flatten(), model[2].weight.grad.flatten()]))
    g = torch.stack(grads)
    torch.testing.assert_close(scores, g[:2] @ g.T)


@pytest.mark.parametrize(
    "kwargs, call, error, match",
    [
        ({}, lambda a, tr, te: a.cache([]), ValueError, "yielded no samples"),
        ({"loss": lambda m, b: loss_fn(m, b).mean()}, lambda a, tr, te: a.cache(tr), ValueError, r"shape \[B\] = \[16\]"),
        ({"layers": ["nope"]}, None, ValueError, "'nope' matches no nn.Linear"),
        ({"device": "meta"}, None, ValueError, "the model is on cpu but device=meta"),
        ({"method": "xx"}, None, ValueError, "method must be one of"),
        ({"compressor": "bogus"}, None, ValueError, "compressor must be one of"),
        ({"method": "trak"}, None, ValueError, "needs output_fn"),
        ({}, lambda a, tr, te: a.attribute(te), RuntimeError, "call cache"),
    ],
)
def test_bad_input_errors(kwargs, call, error, match):
    model, train, test = make_problem(torch.float32)
    fn = kwargs.pop("loss", loss_fn)
    with pytest.raises(error, match=match):
        attr = Attributor(model, fn, compile=False, progress=False, k=16, **kwargs)
        call(attr, train, test)


class EmbedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)).mean(1))


def test_other_parameters_use_vmap_grad(tmp_path):
    torch.manual_seed(0)
    model = EmbedModel().double()
    tokens = torch.randint(0, 12, (10, 4))
    labels = torch.randint(0, 3, (10,))
    batches = [(tokens[:6], labels[:6]), (tokens[6:], labels[6:])]
    kwargs = dict(method="graddot", compressor="identity", param_compressor="identity", k=10**6,
                  dtype=torch.float64, progress=False, param_chunk=4)
    eager = Attributor(model, loss_fn, params=["embed.weight", "norm.*"], compile=False, **kwargs)
    scores = eager.cache(batches).attribute(batches[:1])
    assert eager.block_names == ["head", "param:embed.weight", "param:norm.weight", "param:norm.bias"]
    rows = []
    for i in range(10):
        model.zero_grad()
        loss_fn(model, (tokens[i : i + 1], labels[i : i + 1])).sum().backward()
        rows.append(torch.cat([model.head.weight.grad.T.flatten()] + [p.grad.flatten() for p in
                               (model.embed.weight, model.norm.weight, model.norm.bias)]))
    g = torch.stack(rows)
    torch.testing.assert_close(scores, g[:6] @ g.T)
    compiled = Attributor(model, loss_fn, params=["embed.weight", "norm.*"], compile=True, **kwargs)
    torch.testing.assert_close(compiled.cache(batches).attribute(batches[:1]), scores)
    only_params = Attributor(model, loss_fn, layers=[], params=["norm.bias"], compile=False, **kwargs)
    torch.testing.assert_close(only_params.cache(batches).attribute(batches[:1]), g[:6, -6:] @ g[:, -6:].T)
    with pytest.raises(ValueError, match="'nope' matches no parameter"):
        Attributor(model, loss_fn, params=["nope"], compile=False, **kwargs)


def test_a_single_compressor_object_serves_layers_of_its_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    x = torch.randn(8, 6)
    y = torch.randint(0, 6, (8,))
    import grass_ops

    attr = Attributor(model, loss_fn, compressor=grass_ops.SJLT(36, 12, seed=1), k=12, compile=False, progress=False)
    assert attr.cache([(x, y)]).attribute([(x[:2], y[:2])]).shape == (2, 8)
    with pytest.raises(ValueError, match="other sizes"):
        Attributor(model, loss_fn, compressor=grass_ops.SJLT(35, 12), k=12, compile=False)
