"""Selective Mask training (paper §3.2 Eq. (1) and §B.4.2).

Learn logits S so that masked GradDot scores correlate with unmasked ones:

    maximize  mean_q corr( (<g_i, g_q>)_i , (<w * g_i, w * g_q>)_i )  -  lam * mean(w),   w = sigmoid(S / tau)

(the L1 term is normalized by the number of coordinates, so lam is scale-free). The temperature tau
is annealed geometrically from ``tau_start`` to ``tau_end`` so that w approaches a hard mask; the
deployed mask is the exact top-k of sigmoid(S). Training uses a held-out split of the training
data: its samples are the "training points" i, and a disjoint set of its samples are queries q,
themselves split into objective and validation queries; early stopping watches the validation
correlation of the *hard* top-k mask.

Two forms: plain (per-sample gradients [n, p]) and factorized for linear layers (two masks, over
the inputs and over the output gradients), which never forms a per-sample weight gradient: scores
come from ``grass_ops.factorized_inner`` on ``grass_ops.factorized_mask``'s soft-masked factors.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

import grass_ops
from grass_ops.compressors import SelectiveMask

from .batches import batch_tensors


@dataclass
class MaskTrainingConfig:
    steps: int = 300
    lr: float = 0.05
    lam: float = 0.1
    tau_start: float = 1.0
    tau_end: float = 0.05
    eval_every: int = 10
    patience: int = 8
    query_fraction: float = 0.3  # of the held-out samples, used as queries (the rest are training points)
    val_fraction: float = 0.5  # of the queries, used for early stopping
    seed: int = 0
    progress: bool = True


@dataclass
class MaskResult:
    indices: list[Tensor]  # one index set per mask (plain: 1; factorized: in, out)
    correlation: float  # validation correlation of the hard top-k mask(s) at the best step
    random_mask_correlation: float  # the same statistic for a random mask of the same size
    best_step: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def _row_pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of a with the same row of b."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def _split(n: int, config: MaskTrainingConfig):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    n_query = max(2, int(round(config.query_fraction * n)))
    n_val = max(1, int(round(config.val_fraction * n_query)))
    if n - n_query < 3:
        raise ValueError(f"selective mask training needs more held-out samples, got {n}")
    return perm[n_query:], perm[:n_query - n_val], perm[n_query - n_val : n_query]


def _tau(step: int, config: MaskTrainingConfig) -> float:
    frac = step / max(1, config.steps - 1)
    return config.tau_start * (config.tau_end / config.tau_start) ** frac


class _Problem:
    """Scores of the objective ("train") or validation ("val") queries against the reference points,
    unmasked, soft-masked and hard-masked. The splits are sliced once, at construction."""

    def target(self, which: str) -> Tensor: ...

    def soft(self, which: str, logits: list[Tensor], tau: float) -> Tensor: ...

    def hard(self, which: str, indices: list[Tensor]) -> Tensor: ...


class _PlainProblem(_Problem):
    def __init__(self, grads: Tensor, split):
        ref, q_train, q_val = split
        self.ref, self.queries = grads[ref], {"train": grads[q_train], "val": grads[q_val]}

    def target(self, which):
        return self.queries[which] @ self.ref.T

    def soft(self, which, logits, tau):
        w2 = torch.sigmoid(logits[0] / tau) ** 2
        return (self.queries[which] * w2) @ self.ref.T

    def hard(self, which, indices):
        return self.queries[which][:, indices[0]] @ self.ref[:, indices[0]].T


class _FactorizedProblem(_Problem):
    def __init__(self, x: Tensor, g: Tensor, split):
        ref, q_train, q_val = split
        self.ref = (x[ref], g[ref])
        self.queries = {"train": (x[q_train], g[q_train]), "val": (x[q_val], g[q_val])}

    def target(self, which):
        return grass_ops.factorized_inner(*self.queries[which], *self.ref)

    def soft(self, which, logits, tau):
        xq, gq = grass_ops.factorized_mask(*self.queries[which], logits[0], logits[1], tau)
        xr, gr = grass_ops.factorized_mask(*self.ref, logits[0], logits[1], tau)
        return grass_ops.factorized_inner(xq, gq, xr, gr)

    def hard(self, which, indices):
        xq, gq = grass_ops.factorized_mask(*self.queries[which], indices[0], indices[1])
        xr, gr = grass_ops.factorized_mask(*self.ref, indices[0], indices[1])
        return grass_ops.factorized_inner(xq, gq, xr, gr)


def _train(problem: _Problem, sizes: list[int], ks: list[int], config: MaskTrainingConfig, desc: str) -> MaskResult:
    """Adam on the logits; float32 scores (correlations in float64)."""
    start = time.perf_counter()
    dtype = torch.float64
    logits = [torch.zeros(d, dtype=torch.float32, requires_grad=True) for d in sizes]
    opt = torch.optim.Adam(logits, lr=config.lr)
    with torch.no_grad():
        target_train = problem.target("train").to(dtype)
        target_val = problem.target("val").to(dtype)

    def hard_indices(logits):
        return [torch.topk(s.detach(), k).indices.sort().values for s, k in zip(logits, ks)]

    def val_corr(indices):
        with torch.no_grad():
            return float(_row_pearson(problem.hard("val", indices).to(dtype), target_val).mean())

    gen = torch.Generator().manual_seed(config.seed + 1)
    random_indices = [torch.randperm(d, generator=gen)[:k].sort().values for d, k in zip(sizes, ks)]
    random_corr = val_corr(random_indices)
    best = (-math.inf, 0, hard_indices(logits))
    history, stale = [], 0
    bar = tqdm(range(config.steps), desc=desc, disable=not config.progress, leave=False)
    for step in bar:
        tau = _tau(step, config)
        masked = problem.soft("train", logits, tau).to(dtype)
        corr = _row_pearson(masked, target_train).mean()
        density = torch.stack([torch.sigmoid(s / tau).mean() for s in logits]).mean()
        loss = -corr + config.lam * density
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % config.eval_every == 0 or step == config.steps - 1:
            indices = hard_indices(logits)
            val = val_corr(indices)
            history.append({"step": step, "tau": tau, "objective": -loss.item(), "train_corr": corr.item(),
                            "density": density.item(), "val_corr_hard": val})
            bar.set_postfix(corr=f"{corr.item():.3f}", val=f"{val:.3f}")
            if val > best[0]:
                best, stale = (val, step, indices), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    return MaskResult(best[2], best[0], random_corr, best[1], time.perf_counter() - start, history)


def train_selective_mask(grads: Tensor, k: int, config: MaskTrainingConfig | None = None, desc="selective mask") -> MaskResult:
    """Plain form: grads [n, p] per-sample gradients of the held-out split -> a top-k mask over p."""
    config = config or MaskTrainingConfig()
    if not 1 <= k <= grads.shape[1]:
        raise ValueError(f"k must be in [1, {grads.shape[1]}], got {k}")
    problem = _PlainProblem(grads.float(), _split(grads.shape[0], config))
    return _train(problem, [grads.shape[1]], [k], config, desc)


def train_factorized_selective_mask(x_in: Tensor, g_out: Tensor, k_in: int, k_out: int,
                                    config: MaskTrainingConfig | None = None, desc="factorized mask") -> MaskResult:
    """Factorized form: factors x_in [n, (T,) d_in], g_out [n, (T,) d_out] -> masks of k_in and k_out coordinates."""
    config = config or MaskTrainingConfig()
    if not (1 <= k_in <= x_in.shape[-1] and 1 <= k_out <= g_out.shape[-1]):
        raise ValueError(f"need 1 <= k_in <= {x_in.shape[-1]} and 1 <= k_out <= {g_out.shape[-1]}, got {k_in}, {k_out}")
    problem = _FactorizedProblem(x_in.float(), g_out.float(), _split(x_in.shape[0], config))
    return _train(problem, [x_in.shape[-1], g_out.shape[-1]], [k_in, k_out], config, desc)


def data_fingerprint(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:24]


def save_mask_files(directory: str | Path, layer: str, result: MaskResult, sizes: list[int], form: str, **metadata) -> list[Path]:
    """Write <dir>/<layer>.npz (plain) or <layer>.in.npz + <layer>.out.npz (factorized)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffixes = [""] if form == "plain" else [".in", ".out"]
    paths = []
    for suffix, indices, size in zip(suffixes, result.indices, sizes):
        paths.append(SelectiveMask.save(
            directory / f"{layer}{suffix}.npz", indices, p=size, layer=layer, form=form + suffix,
            correlation=result.correlation, random_mask_correlation=result.random_mask_correlation,
            best_step=result.best_step, training_seconds=result.seconds, **metadata))
    return paths



def collect_factors(model, loss_fn, loader, layers=None):
    """Per-sample factors of the target layers over a loader: {name: (x_in [n, (T,) d_in], g_out)}, digests."""
    from .gradients import captured_factors
    from .layers import find_layers

    infos = find_layers(model, layers)
    parts: dict[str, list] = {n: [] for n in infos}
    digests = []
    for digest, inputs, grads, _ in captured_factors(model, loss_fn, loader, infos):
        digests.append(digest)
        for n in infos:
            parts[n].append((inputs[n].detach(), grads[n].detach()))
    return {n: (torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for n, ps in parts.items()}, infos, digests


def train_masks(model, loss_fn, heldout_loader, out_dir, k: int, form: str = "factorized", blowup: float = 2.0,
                layers=None, config: MaskTrainingConfig | None = None) -> dict[str, MaskResult]:
    """Learn and save a Selective Mask for every target layer from a held-out split of the training data.

    form="plain": a top-k mask over each layer's d_in * d_out weight-gradient coordinates, saved as
    <out_dir>/<layer>.npz (use with compressor "selective_mask:mask_dir=..." or "grass:mask_dir=...",
    where k is the GraSS intermediate k'). form="factorized": masks of k_in' = k_out' = blowup * sqrt(k)
    coordinates (capped at d), saved as <layer>.in.npz / <layer>.out.npz (use "factgrass:mask_dir=...").
    """
    from .compression import weight_gradients

    if form not in ("plain", "factorized"):
        raise ValueError(f"form must be 'plain' or 'factorized', got {form!r}")
    config = config or MaskTrainingConfig()
    factors, infos, digests = collect_factors(model, loss_fn, heldout_loader, layers)
    fingerprint = data_fingerprint(digests)
    results = {}
    for name, (x, g) in factors.items():
        info = infos[name]
        common = dict(target_k=k, seed=config.seed, data_fingerprint=fingerprint, n_heldout=int(x.shape[0]),
                      lam=config.lam, steps=config.steps, tau_start=config.tau_start, tau_end=config.tau_end)
        if form == "plain":
            kk = min(k, info.params)
            result = train_selective_mask(weight_gradients(x, g), kk, config, desc=f"mask {name}")
            save_mask_files(out_dir, name, result, [info.params], "plain", d_in=info.d_in, d_out=info.d_out, **common)
        else:
            root = math.isqrt(k) or 1
            k_in = max(1, min(info.d_in, int(round(blowup * root))))
            k_out = max(1, min(info.d_out, int(round(blowup * root))))
            result = train_factorized_selective_mask(x, g, k_in, k_out, config, desc=f"mask {name}")
            save_mask_files(out_dir, name, result, [info.d_in, info.d_out], "factorized", d_in=info.d_in,
                            d_out=info.d_out, k_in=k_in, k_out=k_out, **common)
        results[name] = result
    return results


def energy_masks(model, loss_fn, heldout_loader, out_dir, k: int, blowup: float = 2.0, layers=None,
                 k_in: int | None = None, k_out: int | None = None, progress: bool = False,
                 scales: dict[str, tuple[Tensor, Tensor]] | None = None, save: bool = True,
                 autocast: torch.dtype | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Data-aware factorized masks, cheaper than Selective Mask training: for every target layer, keep
    the k_in' input coordinates and k_out' output-gradient coordinates with the largest second moment
    (sum over held-out samples and tokens of x_i^2, resp. g_j^2). An LLM layer's activations carry most
    of their energy in a few outlier coordinates, which random masks miss. One pass over
    ``heldout_loader``; the moments are formed inside the backward, so no layer's factors are held. The
    masks are saved like Selective Masks (<layer>.in.npz / <layer>.out.npz, use
    "factgrass:mask_dir=..."), with k_in' = k_out' =
    blowup * sqrt(k) (capped at d) unless given. Returns {layer: (in indices, out indices)}.
    ``progress``: a bar over the batches. ``save=False``: computed, not written (the ranks of a sharded model
    all compute them, rank 0 writes). ``scales``: {layer: (x_in scale [d_in], g_out scale [d_out])} that the
    compressor applies to the factors before its masks (the optimizer normalization's Adafactor factors): the
    coordinates are then ranked by the second moments of the scaled factors (moment * scale**2), so the masks keep
    the energy of what is compressed. ``autocast``: the forward passes under ``torch.autocast`` to that dtype
    (bfloat16 or float16), as the cache's own pass runs; the moments are summed in float64 either way."""
    from .gradients import factor_moments
    from .layers import find_layers

    infos = find_layers(model, layers)
    moments = {n: [torch.zeros(i.d_in, dtype=torch.float64), torch.zeros(i.d_out, dtype=torch.float64)] for n, i in infos.items()}
    digests, samples = [], 0
    batches = tqdm(heldout_loader, desc="energy masks", disable=not progress, leave=False)
    for digest, sums, rows in factor_moments(model, _autocast_forward(loss_fn, autocast), batches, infos):
        digests.append(digest)
        samples += rows
        for n, (x_sum, g_sum) in sums.items():
            moments[n][0] += x_sum.cpu()
            moments[n][1] += g_sum.cpu()
    if samples == 0:
        raise ValueError("heldout_loader yielded no samples")
    for n, (x_scale, g_scale) in (scales or {}).items():
        if n in moments:
            moments[n][0] *= x_scale.detach().to("cpu", torch.float64).square()
            moments[n][1] *= g_scale.detach().to("cpu", torch.float64).square()
    root = math.isqrt(k) or 1
    fingerprint = data_fingerprint(digests)
    out = {}
    for n, info in infos.items():
        kk = [min(d, int(kx)) if kx else max(1, min(d, int(round(blowup * root)))) for d, kx in
              ((info.d_in, k_in), (info.d_out, k_out))]
        chosen = [torch.topk(m, kx).indices.sort().values for m, kx in zip(moments[n], kk)]
        energy = [float(m[c].sum() / m.sum().clamp_min(1e-300)) for m, c in zip(moments[n], chosen)]
        directory = Path(out_dir)
        if save:
            directory.mkdir(parents=True, exist_ok=True)
        for suffix, idx, size, kept in zip((".in", ".out"), chosen, (info.d_in, info.d_out), energy):
            if not save:  # another rank of a sharded model writes them
                continue
            SelectiveMask.save(directory / f"{n}{suffix}.npz", idx, p=size, layer=n, form="energy" + suffix,
                               target_k=k, blowup=blowup, energy_kept=kept, data_fingerprint=fingerprint,
                               n_heldout=samples)
        out[n] = (chosen[0], chosen[1])
    return out


def _autocast_forward(loss_fn, dtype: torch.dtype | None):
    """``loss_fn`` with its forward under ``torch.autocast(dtype)`` on the batch's device (the backward then runs
    each op in the dtype its forward ran in); ``loss_fn`` itself when ``dtype`` is None."""
    if dtype is None:
        return loss_fn
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {dtype}")

    def forward(model, batch):
        with torch.autocast(batch_tensors(batch)[0].device.type, dtype=dtype):
            return loss_fn(model, batch)

    return forward
