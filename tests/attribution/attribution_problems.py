"""Small attribution problems and dense references shared by the attribution tests."""
import os

import pytest
import torch
from torch import nn

from attribution.process_group import exit_now  # skips the shutdown where gloo aborts now and then

N_TRAIN, N_TEST = 48, 6


def make_problem(dtype=torch.float64, seed=0, n_train=N_TRAIN, batch=16):
    """(model, train batches, test batches): a 10-24-4 tanh MLP, classification."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 4)).to(dtype)
    x = torch.randn(n_train + N_TEST, 10, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (n_train + N_TEST,), generator=gen)
    train = [(x[i : min(i + batch, n_train)], y[i : min(i + batch, n_train)]) for i in range(0, n_train, batch)]
    test = [(x[n_train:], y[n_train:])]
    return model, train, test


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def margin(model, batch):
    from attribution.evaluation.examples import margin as digits_margin

    return digits_margin(model, batch)


def dense_grads(model, batches, fn=loss_fn, layers=None):
    """Per-sample weight gradients of fn for the given layers (default: both Linear layers of the
    MLP), [n, p_l] each, flattened as W.grad.T (d_in, d_out)."""
    layers = layers or [model[0], model[2]]
    rows = [[] for _ in layers]
    for batch in batches:
        x, y = batch
        for i in range(len(x)):
            model.zero_grad()
            fn(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
            for j, layer in enumerate(layers):
                rows[j].append(layer.weight.grad.T.flatten().clone())
    return [torch.stack(r) for r in rows]


def block_scores(g_train, g_test, damping, method="if"):
    """Dense IF / GradDot scores [n_test, n_train] of per-block gradients (lists of [n, p_l]; block-diagonal FIM)."""
    scores = torch.zeros(g_test[0].shape[0], g_train[0].shape[0], dtype=torch.float64)
    for g, q in zip(g_train, g_test):
        if method == "if":
            fim = g.T @ g / g.shape[0] + damping * torch.eye(g.shape[1], dtype=torch.float64)
            scores += q @ torch.linalg.solve(fim, g.T)
        else:
            scores += q @ g.T
    return scores


def closed_form(model, train, test, damping, method="if"):
    """Dense IF / GradDot scores of the MLP problem (block-diagonal FIM)."""
    g_train, g_test = dense_grads(model, train), dense_grads(model, test)
    return block_scores(g_train, g_test, damping, method), g_train, g_test


def store_files(root) -> dict[str, bytes]:
    """{relative path: bytes} of every file of a store (locks and temporaries excluded)."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in files:
            if f == "lock" or f.startswith("."):
                continue
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def snapshot(root) -> dict[str, tuple]:
    """{relative path: (size, mtime_ns)} of every entry under root, directories included."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in dirnames + files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size if name in files else None, st.st_mtime_ns)
    return out


class Interrupt(Exception):
    pass


def interrupting(batches, after):
    """Yield batches, raising Interrupt instead of batch number ``after``."""
    for i, b in enumerate(batches):
        if i == after:
            raise Interrupt()
        yield b


def read_line(proc, timeout: float = 120.0) -> str:
    """A child process's next stdout line; fails the test (instead of hanging it) if none comes in time."""
    import selectors

    import pytest

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            pytest.fail(f"no output from the child process within {timeout} s")
    return proc.stdout.readline().strip()


def dense_factors(model, batches, layers, fn=loss_fn):
    """Per-sample factors of each layer, one sample at a time with plain autograd: a list over layers of
    (inputs [n, T, d_in], output gradients [n, T, d_out]); 2-D layer inputs give T = 1."""
    xs, gs = [[] for _ in layers], [[] for _ in layers]
    for batch in batches:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        for i in range(len(x)):
            seen = {}
            hooks = [layer.register_forward_hook(lambda m, a, o, j=j: seen.__setitem__(j, (a[0], o)))
                     for j, layer in enumerate(layers)]
            try:
                value = fn(model, (x[i : i + 1], y[i : i + 1]) if y is not None else x[i : i + 1]).sum()
            finally:
                for hook in hooks:
                    hook.remove()
            outs = torch.autograd.grad(value, [seen[j][1] for j in range(len(layers))])
            for j in range(len(layers)):
                xs[j].append(seen[j][0].detach().reshape(-1, seen[j][0].shape[-1]))
                gs[j].append(outs[j].reshape(-1, outs[j].shape[-1]))
    return [(torch.stack(a), torch.stack(b)) for a, b in zip(xs, gs)]


def kronecker_closed_form(train_factors, test_factors, damping, kind):
    """Dense float64 K-FAC / EK-FAC influence scores from per-sample factors (see dense_factors):
    A = sum x x^T / tokens, G = sum g g^T / samples, P = A (x) G (kfac) or, in the eigenbasis U of A (x) G,
    U diag(mean_n (U^T vec G_n)^2) U^T (ekfac); damping a number or "<f>*mean" of P's eigenvalues."""
    scores = 0
    for (x, g), (xq, gq) in zip(train_factors, test_factors):
        n, t, d_in = x.shape
        a = x.reshape(-1, d_in).T @ x.reshape(-1, d_in) / (n * t)
        gg = g.reshape(-1, g.shape[-1]).T @ g.reshape(-1, g.shape[-1]) / n
        grads = torch.einsum("nti,ntj->nij", x, g).flatten(1)
        queries = torch.einsum("nti,ntj->nij", xq, gq).flatten(1)
        vals_a, vecs_a = torch.linalg.eigh(a)
        vals_g, vecs_g = torch.linalg.eigh(gg)
        basis = torch.kron(vecs_a, vecs_g)
        if kind == "kfac":
            eig = torch.kron(vals_a.clamp_min(0), vals_g.clamp_min(0))
        else:
            eig = ((grads @ basis) ** 2).mean(0)
        lam = float(damping.split("*")[0]) * float(eig.mean()) if isinstance(damping, str) else damping
        precond = basis @ torch.diag(eig + lam) @ basis.T
        scores = scores + queries @ torch.linalg.solve(precond, grads.T)
    return scores


def sequence_loss(model, batch):
    """[B]: a per-token model's outputs, through sin, summed over the tokens and outputs."""
    return model(batch).sin().sum(dim=(1, 2))


def sequence_problem():
    """(model, x): a 5-7-3 tanh MLP applied per token (float64) and 9 sequences of 4 tokens (T > 1), seeded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    return model, torch.randn(9, 4, 5, dtype=torch.float64)


def sequence_closed_form(model, x, kind, damping="0.5*mean"):
    """[3, 9]: the closed-form K-FAC / EK-FAC IF scores of x[:3] against x under :func:`sequence_loss`."""
    layers = [model[0], model[2]]
    return kronecker_closed_form(dense_factors(model, [x], layers, sequence_loss),
                                 dense_factors(model, [x[:3]], layers, sequence_loss), damping, kind)


def _grow_on_two_ranks(rank, world, init_file, store, result, kwargs):
    import torch.distributed as dist

    from attribution import Attributor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, train, test = make_problem(torch.float32, n_train=45, batch=8)  # 6 batches, the last of 5 rows
        attr = Attributor(model, loss_fn, store=store, **kwargs)
        scores = attr.cache(train[:5]).attribute(test)  # 5 batches: an uneven split over 2 ranks
        grown = attr.cache(train).attribute(test)
        torch.save((scores, grown), f"{result}.{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_now(0)


def grow_on_two_ranks_and_one(tmp_path, kwargs: dict):
    """Cache make_problem's 5 then 6 batches (45 rows, the last batch short), scoring after each, with
    2 gloo ranks into tmp_path/"dist" and in one process (one thread: the ranks' GEMM blocking) into
    tmp_path/"single". Returns ([(scores, grown)] per rank, (scores, grown) of the single process)."""
    import torch.multiprocessing as mp

    from attribution import Attributor

    result = str(tmp_path / "scores")
    mp.spawn(_grow_on_two_ranks, args=(2, str(tmp_path / "init"), str(tmp_path / "dist"), result, kwargs), nprocs=2,
             join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, train, test = make_problem(torch.float32, n_train=45, batch=8)
        single = Attributor(model, loss_fn, store=tmp_path / "single", **kwargs)
        expected = (single.cache(train[:5]).attribute(test), single.cache(train).attribute(test))
    finally:
        torch.set_num_threads(threads)
    return [torch.load(f"{result}.{rank}.pt") for rank in range(2)], expected


@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module for tiny problems: one thread (two OpenMP threads run up to 10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
