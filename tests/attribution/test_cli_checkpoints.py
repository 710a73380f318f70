"""cache --checkpoint / --checkpoint-weight (TracIn-CP in the CLI): the store's gradients at several model states,
scored as their weighted sum like Attributor(checkpoints=, checkpoint_weights=); fingerprints recorded and checked."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from attribution import Attributor, llm  # noqa: E402
from attribution.llm import cli  # noqa: E402
from attribution.llm.commands.attribute import attribute_queries  # noqa: E402
from attribution.llm.commands.common import compressor_spec, load_store  # noqa: E402
from attribution.llm.config import CACHE_KEYS, OPTIONAL_KEYS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
        "python list data", "the function creates a list"]
QUERIES = [{"id": "q0", "prompt": "a for", "completion": "loop list"},
           {"id": "q1", "prompt": "the data", "completion": "privacy statement"}]
WEIGHTS = [0.5, 2.0]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    return path


def perturbed(state: dict, seed: int, scale: float = 0.05) -> dict:
    """The state with seeded noise added to every floating-point tensor (another training step, as it were)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


@pytest.fixture
def checkpoints(tiny_llama, tmp_path):
    """(Hugging Face folder, torch.save file) of two states of the tiny model, and the two state dicts."""
    model, _ = llm.load_model(tiny_llama)
    states = [perturbed(model.state_dict(), 1), perturbed(model.state_dict(), 2)]
    model.load_state_dict(states[0])
    folder = tmp_path / "checkpoint-1"
    model.save_pretrained(folder)
    path = tmp_path / "checkpoint-2.pt"
    torch.save(states[1], path)
    return [str(folder), str(path)], states


def _cache_args(store, tiny_llama, corpus, *extra):
    return ["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus), "--k", "16",
            "--batch-size", "2", "--max-length", "8", "--layers", "model.layers.*", "--no-compile", *extra]


def _checkpoint_flags(paths, weights=WEIGHTS):
    return [x for p in paths for x in ("--checkpoint", p)] + [x for w in weights for x in ("--checkpoint-weight", str(w))]


def cli_scores(store, model=None, tokenizer=None) -> dict:
    """{query id: {document id: score}} of the store's attribute pass (the CLI's own function)."""
    store, config, docs = load_store(store)
    if model is None:
        model, tokenizer = llm.load_model(config.model, dtype=config.dtype)
    _, scores = attribute_queries(store, config, docs, model, tokenizer, [dict(q) for q in QUERIES], top_k=2)
    return {q["id"]: dict(zip([d["id"] for d in docs], row.tolist())) for q, row in zip(QUERIES, scores)}


def api_scores(store, states, weights) -> dict:
    """The same scores from the Python API, its checkpoints given as state dicts (in memory, no store)."""
    _, config, _ = load_store(store)
    model, tokenizer = llm.load_model(config.model, dtype=config.dtype)
    attr = Attributor(model, llm.sequence_loss, compressor=compressor_spec(config, store), k=config.k,
                      damping=config.damping, layers=llm.resolve_layers(model, config.layer_patterns), seed=config.seed,
                      compile=False, progress=False, storage_dtype=config.storage_dtype,
                      autocast=None if config.autocast == "none" else config.autocast,
                      checkpoints=states, checkpoint_weights=weights)
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]
    batches, order = llm.document_batches(tokenizer, docs, config.batch_size, config.max_length)
    attr.cache(batches)
    scores = attr.attribute(llm.query_batches(tokenizer, [dict(q) for q in QUERIES], config.batch_size, config.max_length))
    return {q["id"]: {docs[j]["id"]: float(v) for j, v in zip(order, row.tolist())} for q, row in zip(QUERIES, scores)}


def assert_close(found: dict, expected: dict) -> None:
    for q in expected:
        ids = sorted(expected[q])
        assert torch.allclose(torch.tensor([found[q][i] for i in ids]), torch.tensor([expected[q][i] for i in ids]),
                              rtol=1e-4, atol=1e-6), (q, found[q], expected[q])


FRESH = """
import json, sys
sys.path.insert(0, {here!r})
from test_cli_checkpoints import cli_scores
print(json.dumps(cli_scores({store!r})))
"""


def test_weighted_checkpoints_score_as_the_python_api_and_in_a_fresh_process(tiny_llama, tmp_path, corpus, checkpoints):
    paths, states = checkpoints
    store = tmp_path / "store"
    summary = cli.run(_cache_args(store, tiny_llama, corpus, *_checkpoint_flags(paths)))
    assert summary["documents"] == 6
    record = json.loads((store / "cli.json").read_text())
    assert record["flags"]["checkpoint"] == paths and record["flags"]["checkpoint_weight"] == WEIGHTS
    assert [c["path"] for c in record["checkpoints"]] == paths
    assert all(re.fullmatch(r"sha256:[0-9a-f]{24}", c["fingerprint"]) for c in record["checkpoints"])
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["model_fingerprints"] == [c["fingerprint"] for c in record["checkpoints"]]
    found = cli_scores(store)
    assert_close(found, api_scores(store, states, WEIGHTS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FRESH.format(here=str(Path(__file__).parent), store=str(store))],
                          capture_output=True, text=True, env=env, check=True, timeout=300)
    assert_close(json.loads(done.stdout.strip().splitlines()[-1]), found)
    # the --model's own weights as one of the states: `--checkpoint model`
    both = tmp_path / "both"
    cli.run(_cache_args(both, tiny_llama, corpus, "--checkpoint", "model", "--checkpoint", paths[1],
                        "--checkpoint-weight", "1", "--checkpoint-weight", "3"))
    model, _ = llm.load_model(tiny_llama)
    assert_close(cli_scores(both), api_scores(both, [model.state_dict(), states[1]], [1.0, 3.0]))


def test_an_interrupted_cache_with_checkpoints_resumes(tiny_llama, tmp_path, corpus, checkpoints, monkeypatch, capsys):
    paths, _ = checkpoints
    store, whole = tmp_path / "store", tmp_path / "whole"
    flags = ["--masks", "random", *_checkpoint_flags(paths)]  # energy masks would be measured on the cut corpus
    cache = _cache_args(store, tiny_llama, corpus, *flags)
    real = llm.document_batches
    monkeypatch.setattr(llm, "document_batches", lambda *a: (lambda b, o: (b[:2], o))(*real(*a)))  # as if killed
    cli.run(cache)
    for ckpt in ("ckpt_000", "ckpt_001"):
        (store / ckpt / "complete.json").unlink()
    monkeypatch.undo()
    state = torch.load(paths[1])
    torch.save(dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1}), paths[1])
    assert cli.main(cache) == 2  # a checkpoint changed since: refused, naming it
    assert re.search(f"--checkpoint {re.escape(paths[1])} differs from the one .* was cached with",
                     capsys.readouterr().err.strip().splitlines()[-1])
    torch.save(state, paths[1])
    assert cli.run(cache)["documents"] == 6  # resumes
    cli.run(_cache_args(whole, tiny_llama, corpus, *flags))
    assert_close(cli_scores(store), cli_scores(whole))


def exit_status(argv) -> int:
    """cli.main's status, argparse's own errors (which exit) included."""
    try:
        return cli.main(argv)
    except SystemExit as err:
        return err.code


def test_bad_checkpoints_and_weights_are_clear_usage_errors(tiny_llama, tmp_path, corpus, checkpoints, capsys):
    paths, states = checkpoints
    store = tmp_path / "store"
    narrow = dict(states[1], **{"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 32)})
    torch.save(narrow, tmp_path / "narrow.pt")
    torch.save({k: v for k, v in states[1].items() if "layers.1." not in k}, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a state dict")
    cases = [
        (["--checkpoint", str(tmp_path / "narrow.pt")],
         r"--checkpoint .*narrow.pt: checkpoints\[0\]\['model.layers.0.mlp.up_proj.weight'\] has shape \(8, 32\), the "
         r"model's is \(64, 32\)"),
        (["--checkpoint", paths[0], "--checkpoint", str(tmp_path / "missing.pt")],
         r"--checkpoint .*missing.pt: checkpoints\[1\] does not fit the model: missing \['model.layers.1"),
        (["--checkpoint", str(tmp_path / "junk.pt")], "--checkpoint .*junk.pt: .* is not a state dict file"),
        (["--checkpoint", str(tmp_path / "absent")], "--checkpoint .*absent: no such folder or file"),
        (_checkpoint_flags(paths, [1.0]), r"--checkpoint-weight: expected one per --checkpoint \(2\), got 1"),
        (["--checkpoint-weight", "2"], "--checkpoint-weight weighs a --checkpoint: give the checkpoints too"),
        (["--checkpoint", paths[0], "--checkpoint-weight", "nan"], "argument --checkpoint-weight: must be a finite number, got nan"),
    ]
    for extra, message in cases:
        assert exit_status(_cache_args(store, tiny_llama, corpus, *extra)) == 2, extra
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(("grass-attribute: error: ", "grass-attribute cache: error: ")), last
        assert re.search(message, last), last
        assert not (store / "manifest.json").exists() and not (store / "masks").exists()
    cli.run(_cache_args(store, tiny_llama, corpus, *_checkpoint_flags(paths)))
    torch.save(states[0], paths[1])  # the second checkpoint changed after caching
    assert cli.main(["attribute", "--store", str(store), "--prompt", "a for", "--generate", "2",
                     "--out", str(tmp_path / "report")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(f"--checkpoint {re.escape(paths[1])} differs from the one .* was cached with .*new --store", last)


def test_without_checkpoints_cli_json_is_unchanged(tiny_llama, tmp_path, corpus):
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus))
    record = json.loads((store / "cli.json").read_text())
    assert set(record) == {"flags", "corpus"} and set(record["flags"]) == set(CACHE_KEYS) - set(OPTIONAL_KEYS)
    assert len(json.loads((store / "manifest.json").read_text())["model_fingerprints"]) == 1
    assert len(cli.run(["attribute", "--store", str(store), "--prompt", "a for", "--generate", "2", "--top-k", "2",
                        "--out", str(tmp_path / "report")])[0].helpful) == 2


def test_lazy_checkpoints_score_as_state_dicts_and_are_checked_when_loaded():
    from attribution_problems import loss_fn, make_problem

    model, train, test = make_problem()
    states = [perturbed(model.state_dict(), 1), perturbed(model.state_dict(), 2)]
    kwargs = {"method": "tracin", "compressor": "sjlt", "k": 8, "compile": False, "progress": False,
              "dtype": torch.float64, "checkpoint_weights": WEIGHTS}
    eager = Attributor(model, loss_fn, checkpoints=states, **kwargs).cache(train).attribute(test)
    calls = []
    loaders = [lambda s=s: calls.append(1) or s for s in states]
    lazy = Attributor(model, loss_fn, checkpoints=loaders, **kwargs).cache(train).attribute(test)
    assert torch.equal(lazy, eager) and len(calls) > 2  # read whenever needed, not kept
    wrong = dict(states[1], **{"2.weight": torch.zeros(4, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"checkpoints\[1\]\['2.weight'\] has shape \(4, 3\)"):
        Attributor(model, loss_fn, checkpoints=[states[0], lambda: wrong], **kwargs)
