"""``grass-attribute index``: build the store's ANN index (FAISS, the `faiss` extra) for ``attribute --index``."""
from __future__ import annotations

import json

from ... import index as index_module
from ...collectives import agreed, collectively
from ...store import open_store
from ..config import DEFAULT_NORMALIZE
from . import flags as f
from .common import main_rank, require_faiss


def run(args):
    """Build the store's ANN index (FAISS) for `attribute --index`; prints its summary."""
    require_faiss()
    store = open_store(args.store)

    def build():
        records = [store.require_complete(c) for c in store.checkpoints()]
        if not main_rank():
            return None
        rows = max(1, args.memory_budget // (store.columns * len(records) * 8))
        with store.writer():
            return index_module.build(store, records, store.checkpoints(), args.mode, args.factory,
                                      project=args.project or None, train_size=args.train_size, nprobe=args.nprobe,
                                      seed=args.seed, rows_per_block=rows)

    summary = agreed(collectively(build))
    if main_rank():
        print(json.dumps(summary))
    return summary


COMMAND = f.Command("index", "build the store's ANN index (FAISS, the `faiss` extra) for `attribute --index`", [
    f.STORE,
    f.Flag("--factory", 'a FAISS index_factory string, e.g. "IVF4096,PQ64" (default: "Flat" below 20,000 documents, '
                        'else "IVF<about 4 sqrt(n)>,SQfp16")', default=index_module.DEFAULT_FACTORY),
    f.Flag("--mode", "ip: raw vectors (what `attribute` uses by default: raw IF, graddot, tracin), cosine: normalized "
                     "vectors (`attribute --normalize`, gradcos), trak: TRAK-weighted",
           default="cosine" if DEFAULT_NORMALIZE else "ip", choices=index_module.MODES),
    f.Flag("--project", "dimensions kept: the top eigenvectors of the rows' second moment (0: all)",
           default=index_module.DEFAULT_PROJECT, type=f.nonnegative_int),
    f.Flag("--train-size", "rows to train on (default 40 per IVF list)", type=f.positive_int),
    f.Flag("--nprobe", "lists probed by default (default: an eighth of them)", type=f.positive_int),
    f.Flag("--seed", "seed of the index's training sample", default=0, type=f.nonnegative_int),
    f.Flag("--memory-budget", "bytes of training rows read at once", default=1 << 30, type=f.positive_int),
], run)
