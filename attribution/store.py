"""Storage of compressed training gradients: in memory, or on disk, sharded and crash-safe.

On-disk layout (readable with numpy alone; no pickle anywhere)::

    manifest.json                         configuration: model fingerprint, layers, compressor specs
                                          and seeds, dtypes, method; refuses a mismatching config
    ckpt_000/shards/00000000/layer_000.npy [n_shard, k_0] per layer (np.load(..., mmap_mode="r"))
    ckpt_000/shards/00000000/meta.json     rows, batch digest, per-sample values (losses or outputs)
    ckpt_000/fim/layer_000.eigvals.npy     eigendecomposition of the layer's FIM
    ckpt_000/fim/layer_000.eigvecs.npy
    ckpt_000/complete.json                 number of samples, once the checkpoint's cache is complete

A shard is written into a temporary directory and renamed into place only when complete, so a
kill at any moment loses no completed shard and never leaves a partial one visible; ``cache``
resumes after the last complete shard. bfloat16 storage is kept as raw uint16 (numpy has no bf16).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .fim import DampedInverse

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_numpy(t: Tensor, storage: str) -> np.ndarray:
    t = t.detach().to("cpu", STORAGE_DTYPES[storage]).contiguous()
    if storage == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_numpy(a: np.ndarray, storage: str) -> Tensor:
    """A read-only (memory-mapped) array as a tensor without copying; callers never write to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if storage == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))


class MemoryStore:
    """Everything in RAM (``store=None``)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.shards: dict[int, list] = {}
        self.fims: dict[int, list[DampedInverse]] = {}

    def completed_shards(self, ckpt: int) -> dict[int, dict]:
        return {i: meta for i, (_, meta) in self.shards.get(ckpt, {}).items()}

    def write_shard(self, ckpt: int, index: int, layers: list[Tensor], meta: dict) -> None:
        self.shards.setdefault(ckpt, {})[index] = ([t.detach().clone() for t in layers], meta)

    def read_shard(self, ckpt: int, index: int) -> list[Tensor]:
        return self.shards[ckpt][index][0]

    def save_fim(self, ckpt: int, fims: list[DampedInverse]) -> None:
        self.fims[ckpt] = fims

    def load_fim(self, ckpt: int) -> list[DampedInverse] | None:
        return self.fims.get(ckpt)

    def mark_complete(self, ckpt: int, n: int) -> None:
        pass

    def discard_fim(self, ckpt: int) -> None:
        self.fims.pop(ckpt, None)


class DiskStore:
    """Sharded, crash-safe store under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path, manifest: dict, n_layers: int, storage: str = "float32"):
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
        self.root, self.n_layers, self.storage = Path(root), n_layers, storage
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {**manifest, "storage_dtype": storage, "format": "grass_ops.attribution.store/1"}
        path = self.root / "manifest.json"
        if path.exists():
            existing = json.loads(path.read_text())
            diffs = [key for key in sorted(set(existing) | set(manifest)) if existing.get(key) != manifest.get(key)]
            if diffs:
                detail = "; ".join(f"{k}: store has {existing.get(k)!r}, config has {manifest.get(k)!r}" for k in diffs[:4])
                raise ValueError(f"store {self.root} was built with a different configuration ({detail}); "
                                 "use a new store path or the original configuration")
        else:
            atomic_write_json(path, manifest)
        self.manifest = manifest

    def _ckpt(self, ckpt: int) -> Path:
        return self.root / f"ckpt_{ckpt:03d}"

    def completed_shards(self, ckpt: int) -> dict[int, dict]:
        shard_root = self._ckpt(ckpt) / "shards"
        if not shard_root.exists():
            return {}
        done = {}
        for entry in shard_root.iterdir():
            if entry.name.startswith("."):  # an interrupted write: never visible, removed on resume
                shutil.rmtree(entry, ignore_errors=True)
                continue
            done[int(entry.name)] = json.loads((entry / "meta.json").read_text())
        return dict(sorted(done.items()))

    def write_shard(self, ckpt: int, index: int, layers: list[Tensor], meta: dict) -> None:
        shard_root = self._ckpt(ckpt) / "shards"
        shard_root.mkdir(parents=True, exist_ok=True)
        final = shard_root / f"{index:08d}"
        tmp = shard_root / f".{index:08d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for j, t in enumerate(layers):
            with open(tmp / f"layer_{j:03d}.npy", "wb") as f:
                np.save(f, to_numpy(t, self.storage), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(tmp / "meta.json", meta)
        _fsync_dir(tmp)
        os.rename(tmp, final)  # atomic: the shard appears complete or not at all
        _fsync_dir(shard_root)

    def read_shard(self, ckpt: int, index: int) -> list[Tensor]:
        shard = self._ckpt(ckpt) / "shards" / f"{index:08d}"
        return [from_numpy(np.load(shard / f"layer_{j:03d}.npy", mmap_mode="r", allow_pickle=False), self.storage)
                for j in range(self.n_layers)]

    def save_fim(self, ckpt: int, fims: list[DampedInverse]) -> None:
        fim_root = self._ckpt(ckpt) / "fim"
        fim_root.mkdir(parents=True, exist_ok=True)
        for j, fim in enumerate(fims):
            atomic_save_npy(fim_root / f"layer_{j:03d}.eigvals.npy", fim.eigvals.cpu().numpy())
            atomic_save_npy(fim_root / f"layer_{j:03d}.eigvecs.npy", fim.eigvecs.cpu().numpy())
        atomic_write_json(fim_root / "done.json", {"layers": len(fims)})

    def load_fim(self, ckpt: int) -> list[DampedInverse] | None:
        fim_root = self._ckpt(ckpt) / "fim"
        if not (fim_root / "done.json").exists():
            return None
        return [DampedInverse(torch.from_numpy(np.load(fim_root / f"layer_{j:03d}.eigvals.npy")),
                              torch.from_numpy(np.load(fim_root / f"layer_{j:03d}.eigvecs.npy")))
                for j in range(self.n_layers)]

    def discard_fim(self, ckpt: int) -> None:
        done = self._ckpt(ckpt) / "fim" / "done.json"
        if done.exists():
            done.unlink()

    def mark_complete(self, ckpt: int, n: int) -> None:
        atomic_write_json(self._ckpt(ckpt) / "complete.json", {"samples": n})
