"""attribute --method / --preconditioner: every method a store of `grass-attribute cache` (written by another
process) can serve scores as the Python API's Attributor does on that store, the report and the printed JSON record
both, the rest are refused naming the flag and the accepted values, and the default output is unchanged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_usage import attribute_usage_error  # noqa: E402
from test_cli import DOCS, _cache_args  # the CLI tests' corpus and cache flags (skips without the `llm` extra)

from attribution import Attributor, llm
from attribution.llm import cli
from attribution.llm.config import CacheConfig

ROOT = Path(__file__).resolve().parents[2]
QUERIES = [{"id": "q0", "prompt": "a for", "completion": " loop list"},
           {"id": "q1", "prompt": "the data", "completion": " privacy"}]


@pytest.fixture(scope="module")
def fresh_store(tiny_llama, tmp_path_factory):
    """(store, prompts file): the CLI tests' corpus cached by a separate `grass-attribute cache` process."""
    folder = tmp_path_factory.mktemp("methods")
    corpus, store, prompts = folder / "corpus.jsonl", folder / "store", folder / "prompts.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    prompts.write_text("\n".join(map(json.dumps, QUERIES)))
    done = subprocess.run([sys.executable, "-m", "attribution.cli", *_cache_args(store, tiny_llama, corpus)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return store, prompts


def api_scores(store: Path, method: str, preconditioner=None, normalize=False) -> dict[str, list[float]]:
    """{document id: [score per query]} from the Python API: an Attributor over ``store`` with the configuration
    its cli.json records (its energy masks from store/masks), scoring QUERIES."""
    config, _ = CacheConfig.read(store)
    model, tokenizer = llm.load_model(config.model)
    attr = Attributor(model, llm.sequence_loss, method=method, preconditioner=preconditioner, normalize=normalize,
                      compressor=f"{config.compressor},mask_dir={store / 'masks'}", k=config.k, damping=config.damping,
                      store=store, layers=config.layer_patterns, seed=config.seed, compile=False, progress=False,
                      storage_dtype=config.storage_dtype, autocast=None if config.autocast == "none" else config.autocast)
    scores = attr.attribute(llm.query_batches(tokenizer, QUERIES, config.batch_size, config.max_length))  # [2, 6]
    ids = [json.loads(line)["id"] for line in (store / "docs.jsonl").read_text().splitlines()]  # store row order
    return {doc: scores[:, row].tolist() for row, doc in enumerate(ids)}


def cli_attribute(store: Path, prompts: Path, out: Path, capsys, *flags) -> tuple[dict, dict, dict]:
    """({document id: [score per query]}, report.json, printed JSON) of `attribute` listing every document on top."""
    results = cli.run(["attribute", "--store", str(store), "--prompts", str(prompts), "--top-k", str(len(DOCS)),
                       "--out", str(out), *flags])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_id = [{d["id"]: s for d, s in r.helpful} for r in results]
    assert all(len(scores) == len(DOCS) for scores in by_id)
    scores = {doc: [scores[doc] for scores in by_id] for doc in by_id[0]}
    return scores, json.loads((out / "report.json").read_text()), printed


def assert_same_scores(got: dict, want: dict) -> None:
    """The same documents, scores equal up to float32 rounding."""
    assert set(got) == set(want)
    scale = max(abs(s) for scores in want.values() for s in scores)
    for doc, scores in want.items():
        assert got[doc] == pytest.approx(scores, rel=1e-5, abs=1e-6 * scale), doc


@pytest.mark.parametrize("flags, method, preconditioner, normalize", [
    ([], "if", "fim", False),
    (["--normalize"], "if", "fim", True),
    (["--preconditioner", "none"], "if", "none", False),
    (["--method", "graddot"], "graddot", "none", False),
    (["--method", "graddot", "--preconditioner", "none", "--normalize"], "graddot", "none", True),
    (["--method", "gradcos"], "gradcos", "none", True),
    (["--method", "gradcos", "--normalize"], "gradcos", "none", True),  # redundant, accepted
])
def test_each_method_scores_as_the_api_does_and_is_recorded(fresh_store, tmp_path, capsys, flags, method,
                                                            preconditioner, normalize):
    store, prompts = fresh_store
    scores, report, printed = cli_attribute(store, prompts, tmp_path / "report", capsys, *flags)
    assert_same_scores(scores, api_scores(store, method, None if preconditioner == "fim" else preconditioner,
                                          normalize and method != "gradcos"))
    meta = report["meta"]
    assert (meta["method"], meta["preconditioner"], meta["normalize"]) == (method, preconditioner, normalize)
    assert (printed["method"], printed["preconditioner"]) == (method, preconditioner)
    md = (tmp_path / "report" / "report.md").read_text()
    assert ("(F + λI)⁻¹" in md) == (preconditioner == "fim")  # the legend says what the score is
    if method == "gradcos" or normalize and preconditioner == "none":  # a cosine
        assert all(-1 - 1e-5 <= s <= 1 + 1e-5 for row in scores.values() for s in row)
        assert "between -1 and 1" in md


def test_the_default_is_if_with_the_fim_and_its_output_is_unchanged(fresh_store, tmp_path, capsys):
    store, prompts = fresh_store
    default = cli_attribute(store, prompts, tmp_path / "default", capsys)
    explicit = cli_attribute(store, prompts, tmp_path / "explicit", capsys, "--method", "if", "--preconditioner", "fim")
    assert default[:2] == explicit[:2]  # the same scores and report.json
    assert default[2]["queries"] == explicit[2]["queries"]  # the printed JSON too, but for the reports' folders
    md = [(tmp_path / name / "report.md").read_text() for name in ("default", "explicit")]
    assert md[0] == md[1] and "(F + λI)⁻¹" in md[0] and "shrink with the damping" in md[0]
    # the meta of before, with the preconditioner recorded after the method
    assert list(default[1]["meta"]) == ["model", "method", "preconditioner", "normalize", "compressor", "k", "damping",
                                        "documents", "top_k", "per_token", "index"]
    assert list(default[2]) == ["reports", "method", "preconditioner", "queries"]
    graddot = cli_attribute(store, prompts, tmp_path / "graddot", capsys, "--method", "graddot")[0]
    assert_same_scores(cli_attribute(store, prompts, tmp_path / "plain", capsys, "--preconditioner", "none")[0], graddot)
    assert graddot != default[0]  # the FIM changes the scores


@pytest.mark.parametrize("flags, message", [
    (["--method", "bogus"], "argument --method: invalid choice: 'bogus' (choose from 'if', 'graddot', 'gradcos', "
                            "'tracin', 'trak')"),
    (["--preconditioner", "bogus"], "argument --preconditioner: invalid choice: 'bogus'"),
    (["--method", "tracin"], "--method tracin sums gradient dot products over training checkpoints"),
    (["--method", "trak"], "--method trak needs the gradients of a model-output function"),
    (["--preconditioner", "kfac"], "--preconditioner kfac needs its data (kfac: the target layers' Kronecker factors) "
                                   "collected while caching"),
    (["--preconditioner", "ekfac"], "accepted: fim, none"),
    (["--method", "graddot", "--preconditioner", "fim"], "--preconditioner fim applies to --method if; --method graddot "
                                                         "uses none"),
    (["--method", "gradcos", "--no-normalize"], "--method gradcos is the cosine of the gradients (unit-normalized by "
                                                "definition): drop --no-normalize"),
])
def test_what_the_store_cannot_score_exits_2_naming_the_flag(fresh_store, tmp_path, capsys, flags, message):
    store, prompts = fresh_store
    last = attribute_usage_error(store, prompts, tmp_path / "r", flags, capsys)
    assert message in last, last
    if flags[:2] == ["--method", "tracin"] or flags[:2] == ["--method", "trak"]:
        assert "accepted: if, graddot, gradcos" in last
    assert not (tmp_path / "r").exists()  # refused before anything is written

