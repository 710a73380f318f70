"""A model sharded with FSDP2 across 2 gloo ranks (run by torchrun, tests/attribution/test_fsdp.py): the tiny random
Llama of trainer_runs, cached over BATCHES (5 batches of 1..3 sequences of other lengths: the ranks get 3 and 2)
into a store, first the first 3 batches then all 5 (the store grows: a round both ranks stored is skipped, a stored
batch beside a new one is a dropped round), scored against QUERIES. Rank 0 writes the scores, the top-k and the
self-influence to --report, with the errors of a partly sharded model and of a changed batch on one rank."""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from attribution.process_group import exit_now  # skips the shutdown where gloo aborts now and then

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer_runs import OPTIONS, QUERIES, collate, examples, tiny_model  # noqa: E402

from attribution import Attributor  # noqa: E402
from attribution.integrations import causal_lm_loss  # noqa: E402
from attribution.sharding import shard  # noqa: E402

EXAMPLES = examples(11)


def _unlabelled_first(batch: dict) -> dict:
    """The batch with its first sample's labels all -100 (that sample's gradient is zero)."""
    labels = batch["labels"].clone()
    labels[0] = -100
    return {**batch, "labels": labels}


# the first sample of batch 2 has a zero gradient: when it is stored, rank 0 compresses it as a dropped round
BATCHES = [collate(EXAMPLES[0:2]), collate(EXAMPLES[2:5]), _unlabelled_first(collate(EXAMPLES[5:7])),
           collate(EXAMPLES[7:8]), collate(EXAMPLES[8:10])]


def attributor(model, store):
    return Attributor(model, causal_lm_loss, store=store, compile=False, progress=False, damping=0.1, **OPTIONS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--report", required=True)
    opts = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    partly = tiny_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in partly.model.layers:
        fully_shard(block, mesh=mesh)
    try:
        attributor(partly, opts.store + "_partly")
        refused = None
    except ValueError as err:
        refused = str(err)
    model = shard(tiny_model())
    attributor(model, opts.store).cache(BATCHES[:3])
    attr = attributor(model, opts.store).cache(BATCHES)
    report = {"scores": attr.attribute(QUERIES), "top_k": attr.top_k(QUERIES, k=3), "self": attr.self_influence(),
              "refused": refused, "rows": attr.n_train}
    changed = [*BATCHES[:3], collate(EXAMPLES[9:11]), *BATCHES[4:]]  # rank 1's batch 3 differs: every rank raises
    try:
        attributor(model, opts.store).cache(changed)
    except Exception as err:  # noqa: BLE001 - the message is the test's
        report["changed"] = f"{type(err).__name__}: {err}"
    if rank == 0:
        torch.save(report, opts.report)
    dist.destroy_process_group()
    exit_now(0)


if __name__ == "__main__":
    main()
