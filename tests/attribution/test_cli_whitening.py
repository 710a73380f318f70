"""cache --preconditioner kfac-whitened|ekfac-whitened and --curvature-documents: a whitened store cached by another
process scores as the Python API does over it, grows keeping its curvature, and every other scoring of it is refused
by name (as is a whitened preconditioner on a raw store)."""
import json

import pytest
from cli_runs import fresh_process
from cli_usage import attribute_usage_error
from test_cli import DOCS, _cache_args  # the CLI tests' corpus and cache flags (skips without the `llm` extra)

from attribution import Attributor, llm, whitening
from attribution.llm import cli
from attribution.llm.config import CacheConfig

QUERIES = [{"id": "q0", "prompt": "a for", "completion": " loop list"},
           {"id": "q1", "prompt": "the data", "completion": " privacy"}]


@pytest.fixture
def files(tmp_path):
    corpus, prompts = tmp_path / "corpus.jsonl", tmp_path / "prompts.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    prompts.write_text("\n".join(map(json.dumps, QUERIES)))
    return corpus, prompts


def exit_code(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as exit_info:  # argparse's own errors exit from inside main
        return exit_info.code


def api_scores(store) -> dict[str, list[float]]:
    """{document id: [score per query]} of an Attributor over the store with the configuration its cli.json records."""
    config, _ = CacheConfig.read(store)
    model, tokenizer = llm.load_model(config.model)
    attr = Attributor(model, llm.sequence_loss, compressor=config.compressor, k=config.k, damping=config.damping, store=store,
                      layers=config.layer_patterns, seed=config.seed, compile=False, progress=False,
                      storage_dtype=config.storage_dtype, autocast=None if config.autocast == "none" else config.autocast,
                      preconditioner=config.preconditioner, whitening_masks=config.masks)
    scores = attr.attribute(llm.query_batches(tokenizer, QUERIES, config.batch_size, config.max_length))
    ids = [json.loads(line)["id"] for line in (store / "docs.jsonl").read_text().splitlines()]
    return {doc: scores[:, row].tolist() for row, doc in enumerate(ids)}


def test_a_whitened_store_from_another_process_scores_as_the_api(tiny_llama, tmp_path, files, capsys):
    corpus, prompts = files
    store = tmp_path / "store"
    flags = ["--preconditioner", "ekfac-whitened", "--curvature-documents", "4", "--damping", "0.1", "--limit", "4"]
    done = fresh_process(*_cache_args(store, tiny_llama, corpus, *flags))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["documents"] == 4 and summary["seconds"]["whitening"] > 0
    config, _ = CacheConfig.read(store)
    assert (config.preconditioner, config.curvature_documents, config.damping) == ("ekfac-whitened", 4, 0.1)
    assert not (store / "masks").exists()  # the masks are chosen in the whitened eigenbasis, not measured raw
    # a larger --limit grows the store: the new documents are whitened by the pinned curvature of the first 4
    before = json.loads((store / "ckpt_000" / whitening.RESULT / "done.json").read_text())["fingerprint"]
    grown = cli.run(_cache_args(store, tiny_llama, corpus, *flags[:-2]))
    assert grown["documents"] == len(DOCS) and grown["added_documents"] == len(DOCS) - 4
    assert json.loads((store / "ckpt_000" / whitening.RESULT / "done.json").read_text())["fingerprint"] == before
    capsys.readouterr()
    results = cli.run(["attribute", "--store", str(store), "--prompts", str(prompts), "--top-k", str(len(DOCS)),
                       "--out", str(tmp_path / "report")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["preconditioner"] == "ekfac-whitened"
    got = [{d["id"]: s for d, s in r.helpful} for r in results]
    want = api_scores(store)
    scale = max(abs(s) for row in want.values() for s in row)
    for doc, scores in want.items():
        assert [row[doc] for row in got] == pytest.approx(scores, rel=1e-5, abs=1e-6 * scale), doc
    assert "C(P^-1/2 q)" in (tmp_path / "report" / "report.md").read_text()
    for flags, message in [(["--method", "graddot"], "holds whitened gradients"),
                           (["--preconditioner", "fim"], "holds whitened gradients"),
                           (["--preconditioner", "kfac-whitened"], "holds whitened gradients")]:
        assert message in attribute_usage_error(store, prompts, tmp_path / "x", flags, capsys)
    assert exit_code(_cache_args(store, tiny_llama, corpus, "--preconditioner", "ekfac-whitened", "--curvature-documents",
                                 "3", "--damping", "0.1")) == 2  # another curvature sample is another store
    assert "--curvature-documents cached 4, given 3" in capsys.readouterr().err


def test_a_whitened_preconditioner_on_a_raw_store_is_refused(tiny_llama, tmp_path, files, capsys):
    corpus, prompts = files
    store = tmp_path / "raw"
    cli.run(_cache_args(store, tiny_llama, corpus, "--limit", "2"))
    message = attribute_usage_error(store, prompts, tmp_path / "x", ["--preconditioner", "ekfac-whitened"], capsys)
    assert "is how a store is cached" in message
    assert exit_code(_cache_args(tmp_path / "other", tiny_llama, corpus, "--curvature-documents", "2")) == 2
    assert "--curvature-documents is the sample of --preconditioner" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # refused before anything is written
