import numpy as np
import pytest
import torch
from torch import nn

from attribution import Attributor
from attribution.selective_mask import (
    MaskTrainingConfig,
    train_factorized_selective_mask,
    train_masks,
    train_selective_mask,
)

CONFIG = MaskTrainingConfig(steps=120, lr=0.1, eval_every=10, patience=20, progress=False)


def test_plain_mask_finds_the_informative_coordinates():
    gen = torch.Generator().manual_seed(0)
    scale = torch.ones(200) * 0.05
    scale[torch.randperm(200, generator=gen)[:20]] = 3.0  # 20 coordinates carry the inner products
    grads = torch.randn(120, 200, generator=gen) * scale
    result = train_selective_mask(grads, k=20, config=CONFIG)
    informative = set(torch.nonzero(scale > 1).flatten().tolist())
    assert len(informative & set(result.indices[0].tolist())) >= 18
    assert result.correlation > 0.95 > result.random_mask_correlation
    assert result.history and "val_corr_hard" in result.history[0]


def test_factorized_mask_beats_random():
    gen = torch.Generator().manual_seed(1)
    in_scale, out_scale = torch.full((30,), 0.05), torch.full((20,), 0.05)
    in_scale[:6], out_scale[:5] = 2.0, 2.0
    x = torch.randn(100, 3, 30, generator=gen) * in_scale
    g = torch.randn(100, 3, 20, generator=gen) * out_scale
    result = train_factorized_selective_mask(x, g, 6, 5, CONFIG)
    assert set(result.indices[0].tolist()) == set(range(6)) and set(result.indices[1].tolist()) == set(range(5))
    assert result.correlation > result.random_mask_correlation


def _digits_like(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(96, 16)
    y = torch.randint(0, 5, (96,))
    return model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_masks_are_saved_with_metadata_and_loaded_by_compressors(tmp_path):
    model, batches = _digits_like()
    train_masks(model, loss_fn, batches, tmp_path / "fact", k=16, form="factorized", config=CONFIG)
    train_masks(model, loss_fn, batches, tmp_path / "plain", k=16, form="plain", config=CONFIG)
    with np.load(tmp_path / "fact" / "0.in.npz") as f:
        meta = __import__("json").loads(str(f["metadata"]))
    assert meta["layer"] == "0" and meta["k_in"] == 8 and "data_fingerprint" in meta and "correlation" in meta
    attr = Attributor(model, loss_fn, compressor=f"factgrass:mask_dir={tmp_path / 'fact'}", k=16, compile=False, progress=False)
    assert attr.compressors["0"].in_mask.metadata["form"] == "factorized.in"
    scores = attr.cache(batches).attribute(batches[:1])
    assert torch.isfinite(scores).all()
    sm = Attributor(model, loss_fn, compressor=f"selective_mask:mask_dir={tmp_path / 'plain'}", k=16, compile=False, progress=False)
    assert sm.compressors["0"].out_features == 16


def test_missing_or_mismatched_masks_fail_loudly(tmp_path):
    model, batches = _digits_like()
    with pytest.raises(FileNotFoundError, match="refusing to fall back"):
        Attributor(model, loss_fn, compressor=f"factgrass:mask_dir={tmp_path}", k=16, compile=False)
    train_masks(model, loss_fn, batches, tmp_path, k=16, form="factorized", config=CONFIG)
    with pytest.raises(ValueError, match="expected k="):
        Attributor(model, loss_fn, compressor=f"factgrass:mask_dir={tmp_path}", k=64, compile=False)
    with pytest.raises(ValueError, match="needs mask_dir"):
        Attributor(model, loss_fn, compressor="selective_mask", k=16, compile=False)
