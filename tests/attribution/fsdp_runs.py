"""A model sharded with FSDP2 across 2 gloo ranks (run by torchrun, tests/attribution/test_fsdp.py): the tiny random
Llama of trainer_runs, cached over BATCHES (5 batches of 1..3 sequences of other lengths: the ranks get 3 and 2)
into a store, first the first 3 batches then all 5 (the store grows: the stored batches are compressed again as
dropped rounds), scored against QUERIES. Rank 0 writes the scores, the top-k and the self-influence to --report;
a partly sharded model's error is recorded too."""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer_runs import OPTIONS, QUERIES, collate, examples, tiny_model  # noqa: E402

from attribution import Attributor  # noqa: E402
from attribution.integrations import causal_lm_loss  # noqa: E402
from attribution.sharding import shard  # noqa: E402

EXAMPLES = examples(10)
BATCHES = [collate(EXAMPLES[0:2]), collate(EXAMPLES[2:5]), collate(EXAMPLES[5:6]), collate(EXAMPLES[6:8]),
           collate(EXAMPLES[8:10])]


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
    if rank == 0:
        torch.save(report, opts.report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
