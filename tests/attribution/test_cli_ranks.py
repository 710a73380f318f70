"""`grass-attribute cache` on two gloo ranks that do not run the same command: ranks that disagree on a
flag or read different corpora all fail with the same error before anything is written, and an error
while one rank builds its Attributor reaches every rank."""
import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attribution.process_group import exit_now  # skips the shutdown where gloo aborts now and then

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from attribution.llm import cli  # noqa: E402
from attribution.llm.commands import common as commands_common  # noqa: E402

DOCS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
        "python list data", "the function creates a list"]
OTHER_DOCS = [*DOCS[:3], "assert statement python", *DOCS[4:]]  # the same shape: ids, count, one text differs
PERTURBATIONS = {"none": [], "k": ["--k", "32"], "seed": ["--seed", "1"], "damping": ["--damping", "0.01"],
                 "max-length": ["--max-length", "7"], "storage-dtype": ["--storage-dtype", "bfloat16"],
                 "masks": ["--masks", "random"], "limit": ["--limit", "5"], "corpus": []}


def _rank(rank, world, folder, argvs, broken_rank):
    """Run rank ``rank``'s command in folder/rank<r> (where its own corpus.jsonl lies, as on a node of its
    own); record {"ok": True} or {"error"} in folder/rank<r>.json."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    os.chdir(os.path.join(folder, f"rank{rank}"))
    if rank == broken_rank:  # this rank's Attributor cannot be built
        def broken(*args, **kwargs):
            raise ValueError(f"rank {rank}'s Attributor cannot be built")

        commands_common.Attributor = broken  # where the commands build it
    try:
        cli.run(argvs[rank])
        outcome = {"ok": True}
    except BaseException as err:  # noqa: BLE001 - recorded for the test to compare
        outcome = {"error": f"{type(err).__name__}: {err}"}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    exit_now(0)


def _two_ranks(folder, argvs, corpora=(DOCS, DOCS), broken_rank=-1) -> list[dict]:
    """Each rank's outcome of its command, run with its own corpus.jsonl (``corpora[rank]``)."""
    for rank, docs in enumerate(corpora):
        (folder / f"rank{rank}").mkdir(parents=True)
        (folder / f"rank{rank}" / "corpus.jsonl").write_text(
            "\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(docs)))
    mp.spawn(_rank, args=(2, str(folder), argvs, broken_rank), nprocs=2, join=True)
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _cache_args(store, tiny_llama, *extra):
    return ["cache", "--store", str(store), "--model", tiny_llama, "--corpus", "corpus.jsonl", "--k", "16",
            "--batch-size", "2", "--max-length", "8", "--layers", "model.layers.*", "--no-compile", *extra]


def _files(store) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()) if store.exists() else []


def test_ranks_that_read_different_corpora_fail_alike_before_writing(tiny_llama, tmp_path):
    store = tmp_path / "store"
    argv = _cache_args(store, tiny_llama)
    outcomes = _two_ranks(tmp_path / "run", [argv, argv], corpora=(DOCS, OTHER_DOCS))
    assert outcomes[0] == outcomes[1] and "error" in outcomes[0], outcomes
    assert "ranks disagree on the corpus" in outcomes[0]["error"]
    assert _files(store) == []  # refused before anything was written


def test_an_error_building_one_ranks_attributor_reaches_every_rank(tiny_llama, tmp_path):
    argv = _cache_args(tmp_path / "store", tiny_llama, "--masks", "random")
    outcomes = _two_ranks(tmp_path / "run", [argv, argv], broken_rank=1)
    assert outcomes[1] == {"error": "ValueError: rank 1's Attributor cannot be built"}
    assert "rank 1 failed: ValueError: rank 1's Attributor cannot be built" in outcomes[0]["error"], outcomes


@settings(max_examples=3, deadline=None)
@given(perturbation=st.sampled_from(sorted(PERTURBATIONS)), rank=st.integers(0, 1))
@example(perturbation="none", rank=0)  # the ranks agree: they cache the store together
def test_ranks_with_perturbed_flags_or_corpora_agree_or_fail_alike(tiny_llama, tmp_path_factory, perturbation, rank):
    """One rank's flags or corpus perturbed: both ranks cache the store together (no perturbation), or
    both fail with the same message and nothing is written."""
    folder = tmp_path_factory.mktemp("ranks")
    store = folder / "store"
    argvs = [_cache_args(store, tiny_llama) for _ in range(2)]
    argvs[rank] = _cache_args(store, tiny_llama, *PERTURBATIONS[perturbation])
    corpora = [DOCS, DOCS]
    corpora[rank] = OTHER_DOCS if perturbation == "corpus" else DOCS
    outcomes = _two_ranks(folder / "run", argvs, corpora)
    assert outcomes[0] == outcomes[1], outcomes
    if perturbation == "none":
        assert outcomes[0] == {"ok": True} and cli.run(["verify", "--store", str(store)])["ok"]
    else:
        assert "ranks disagree" in outcomes[0]["error"] and _files(store) == []
