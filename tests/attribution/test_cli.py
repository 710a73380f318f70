"""The grass-attribute CLI: cache / attribute / select / verify, resume, refusals and clear errors."""
import argparse
import json
import re
import sys

import pytest
import torch
from attribution_problems import snapshot, store_files

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from attribution import IncompleteStoreError, StoreError, llm, process_group  # noqa: E402
from attribution.llm import cli  # noqa: E402

DOCS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
        "python list data", "the function creates a list"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    return path


def _cache_args(store, tiny_llama, corpus, *extra):
    return ["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus), "--k", "16",
            "--batch-size", "2", "--max-length", "8", "--layers", "model.layers.*", "--no-compile", *extra]


def test_cache_attribute_select_and_resume(tiny_llama, tmp_path, local_task, corpus):
    store = tmp_path / "store"
    cache = _cache_args(store, tiny_llama, corpus)
    summary = cli.run(cache)
    assert summary["documents"] == 6 and summary["layers"] == 14 and summary["compiled"] is False
    before = snapshot(store)
    assert cli.run(cache)["documents"] == 6  # a complete store: nothing is written
    assert snapshot(store) == before
    with pytest.raises(SystemExit, match="was cached with"):
        cli.run([*cache[:-3], "--layers", "model.layers.0.*", "--no-compile"])
    corpus.write_text(corpus.read_text().replace("privacy", "security"))
    with pytest.raises(SystemExit, match="the corpus differs"):
        cli.run(cache)
    corpus.write_text(corpus.read_text().replace("security", "privacy"))
    results = cli.run(["attribute", "--store", str(store), "--prompt", "a for", "--generate", "3", "--top-k", "2",
                       "--out", str(tmp_path / "report")])
    assert len(results) == 1 and len(results[0].helpful) == 2 and len(results[0].harmful) == 2
    assert not {d["id"] for d, _ in results[0].helpful} & {d["id"] for d, _ in results[0].harmful}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["queries"][0]["helpful"][0]["id"].startswith("d")
    keep = cli.run(["select", "--store", str(store), "--task", "tiny_qa", "--include-path", local_task, "--fraction",
                    "0.5", "--out", str(tmp_path / "selected.jsonl")])
    lines = (tmp_path / "selected.jsonl").read_text().splitlines()
    assert len(keep) == 3 == len(lines) and "score" in json.loads(lines[0])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"top_k": 1, "generate": 2}))
    results = cli.run(["--config", str(config), "attribute", "--store", str(store), "--prompt", "the", "--out",
                       str(tmp_path / "r2")])
    assert len(results[0].helpful) == 1


def test_cache_compiles_when_asked_and_reports_it(tiny_llama, tmp_path, corpus):
    summary = cli.run([*_cache_args(tmp_path / "store", tiny_llama, corpus)[:-1], "--compile"])
    assert summary["compile"] == "on" and summary["compiled"] is True and summary["graph_breaks"] is not None
    assert summary["compile_seconds"] > 0 and summary["compile_fallback"] is None
    phases = summary["seconds"]
    assert set(phases) == {"load_model", "tokenize", "masks", "attributor", "gradients", "compile", "fim", "cache_other"}
    assert all(v >= 0 for v in phases.values()) and phases["compile"] == summary["compile_seconds"]
    assert summary["peak_rss_mb"] > 100 and summary["process_seconds"] > phases["gradients"]


def test_cache_compiles_the_repeated_blocks_when_asked(tiny_llama, tmp_path, corpus):
    """--compile regional: the store ranks as an eager store does, a second cache of it computes nothing, and the
    summary reports the compile."""
    eager = tmp_path / "eager"
    cli.run(_cache_args(eager, tiny_llama, corpus, "--autocast", "none"))
    store = tmp_path / "store"
    args = [a for a in _cache_args(store, tiny_llama, corpus, "--autocast", "none") if a != "--no-compile"]
    args += ["--compile", "regional"]
    summary = cli.run(args)
    assert summary["compile"] == "regional" and summary["compiled"] is True and summary["compile_fallback"] is None
    assert summary["compile_seconds"] > 0 and summary["seconds"]["compile"] == summary["compile_seconds"]
    assert cli.run(args)["added_documents"] == 0
    assert cli.compile_decision("regional", 1) == "regional"
    attribute = ["attribute", "--prompt", "a for", "--generate", "2", "--top-k", "6"]
    ours = cli.run([*attribute, "--store", str(store), "--out", str(tmp_path / "r1")])[0]
    theirs = cli.run([*attribute, "--store", str(eager), "--out", str(tmp_path / "r2")])[0]
    assert [d["id"] for d, _ in ours.helpful] == [d["id"] for d, _ in theirs.helpful]
    for (_, a), (_, b) in zip(ours.helpful, theirs.helpful):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6)


def test_compile_auto_compiles_large_corpora_only(tiny_llama, tmp_path, corpus):
    summary = cli.run(_cache_args(tmp_path / "store", tiny_llama, corpus)[:-1])  # the default: --compile auto
    assert summary["compile"] == "auto" and summary["compiled"] is False  # a few tokens: eager
    assert summary["real_tokens"] < min(cli.COMPILE_MIN_TOKENS.values())
    for autocast, tokens in cli.COMPILE_MIN_TOKENS.items():
        assert [cli.compile_decision("auto", n, autocast) for n in (tokens - 1, tokens)] == [False, True]
    assert cli.compile_decision("on", 1) and not cli.compile_decision("off", 10**9)


def test_a_long_prompt_keeps_its_completion(tiny_llama):
    _, tok = llm.load_model(tiny_llama)
    query = {"prompt": "the a for loop lambda assert python list data", "completion": " privacy statement"}
    ids, targets = llm.query_tokens(tok, query, max_length=5)
    assert len(ids) == 5 and targets == [0, 0, 0, 1, 1]
    assert tok.decode(ids[-2:]).split() == ["privacy", "statement"]
    assert tok.decode(ids[:3]).split() == ["python", "list", "data"]  # the prompt's end, cut from the left
    with pytest.raises(ValueError, match="more than --max-length 1"):
        llm.query_tokens(tok, query, max_length=1)
    with pytest.raises(ValueError, match="empty completion"):
        llm.query_tokens(tok, {"prompt": "the", "completion": ""}, max_length=5)


def test_documents_without_a_target_token_are_named(tiny_llama):
    _, tok = llm.load_model(tiny_llama)
    with pytest.raises(ValueError, match="document 'tiny' has 1 token"):
        llm.document_batches(tok, [{"id": "ok", "text": "a for loop"}, {"id": "tiny", "text": "the"}], 2, 8)


def test_bad_flags_are_refused_before_the_store_is_touched(tiny_llama, tmp_path, corpus):
    store = tmp_path / "store"
    with pytest.raises(ValueError, match="compressor must be one of"):
        cli.run(_cache_args(store, tiny_llama, corpus, "--compressor", "bogus"))
    assert not (store / "cli.json").exists() and not (store / "docs.jsonl").exists()
    with pytest.raises(SystemExit, match=r"--layers patterns \['nothing\.\*'\] match no module"):
        cli.run([*_cache_args(store, tiny_llama, corpus)[:-2], "model.layers.*", "nothing.*", "--no-compile"])
    assert not (store / "cli.json").exists()
    assert cli.run(_cache_args(store, tiny_llama, corpus))["documents"] == 6  # the corrected command works
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"top_k": 1, "topk": 3}))
    with pytest.raises(SystemExit, match=r"unknown keys \['topk'\]"):
        cli.run(["--config", str(config), "attribute", "--store", str(store), "--prompt", "the"])
    for limit in ("0", "-5", "x"):
        with pytest.raises(SystemExit):
            cli.run(_cache_args(tmp_path / "other", tiny_llama, corpus, "--limit", limit))


def test_bad_input_files_name_file_and_line(tiny_llama, tmp_path, corpus):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "text": "a for loop"}\n{"id": 2, "text": oops}\n')
    with pytest.raises(ValueError, match=f"{broken}:2: invalid JSON"):
        cli.run(_cache_args(tmp_path / "s1", tiny_llama, broken))
    latin = tmp_path / "latin.TXT"  # suffixes are matched case-insensitively
    latin.write_bytes("first paragraph\n\nsecond caf\xe9 paragraph".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin}:3: not valid UTF-8"):
        cli.run(_cache_args(tmp_path / "s2", tiny_llama, latin))
    upper = tmp_path / "upper.JSONL"
    upper.write_text(corpus.read_text())
    assert cli.run(_cache_args(tmp_path / "s3", tiny_llama, upper, "--limit", "4"))["documents"] == 4
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a for", "completion": " loop"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=f"{prompts}:3: expected a JSON object"):
        cli.run(["attribute", "--store", str(tmp_path / "s3"), "--prompts", str(prompts)])


def test_an_incomplete_store_is_refused_by_attribute_and_select(tiny_llama, tmp_path, corpus, monkeypatch):
    store = tmp_path / "store"
    real = llm.document_batches
    monkeypatch.setattr(llm, "document_batches", lambda *a: (lambda b, o: (b[:2], o))(*real(*a)))  # as if killed
    cli.run(_cache_args(store, tiny_llama, corpus))
    (store / "ckpt_000" / "complete.json").unlink()
    monkeypatch.undo()
    with pytest.raises(IncompleteStoreError, match="did not complete"):
        cli.run(["attribute", "--store", str(store), "--prompt", "a for", "--generate", "2"])
    target = tmp_path / "target.jsonl"
    target.write_text('{"text": "a for loop"}\n')
    with pytest.raises(IncompleteStoreError, match="did not complete"):
        cli.run(["select", "--store", str(store), "--target", str(target)])
    cli.run(_cache_args(store, tiny_llama, corpus))  # resumes
    assert len(cli.run(["select", "--store", str(store), "--target", str(target), "--fraction", "0.5"])) == 3


def test_reports_escape_everything_from_the_corpus(tiny_llama, tmp_path):
    hostile = tmp_path / "hostile.jsonl"
    payload = "<img src=x onerror=alert(1)>"
    hostile.write_text("\n".join(json.dumps({"id": f"{payload}{i}", "text": f"the list | {payload} `x` data"})
                                 for i in range(3)))
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, hostile))
    cli.run(["attribute", "--store", str(store), "--prompts", str(_prompts(tmp_path, payload)), "--top-k", "2",
             "--out", str(tmp_path / "report")])
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    md = (tmp_path / "report" / "report.md").read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md  # shown as text, never as a tag
    assert "the list \\| &lt;img" in md and "\\`x\\`" in md  # no pipe opens a table cell, no backtick a code span
    lists = json.loads((tmp_path / "report" / "report.json").read_text())["queries"][0]
    assert len(lists["helpful"]) == 2 and len(lists["harmful"]) == 1  # 3 documents: the bottom list never repeats the top
    assert not {d["id"] for d in lists["helpful"]} & {d["id"] for d in lists["harmful"]}
    assert "The corpus holds 3 documents, fewer than 2·k = 4" in md


def _prompts(tmp_path, payload):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": f"{payload} the", "completion": " list data"}) + "\n")
    return path


def test_sequence_loss_ignores_padding_exactly(tiny_llama):
    model, tok = llm.load_model(tiny_llama)
    docs = [{"id": "0", "text": "the data privacy statement"}, {"id": "1", "text": "a for loop"}]
    (batch,), order = llm.document_batches(tok, docs, batch_size=2, max_length=8)
    (alone,), _ = llm.document_batches(tok, docs[1:], 1, 3)
    row = order.index(1)
    torch.testing.assert_close(llm.sequence_loss(model, batch)[row], llm.sequence_loss(model, alone)[0], rtol=1e-5, atol=1e-5)


def test_flag_values_are_checked_on_the_command_line_and_in_config_files(tiny_llama, tmp_path, corpus):
    store = tmp_path / "store"
    for flags in (["--max-length", "1"], ["--batch-size", "0"], ["--batch-size", "-1"], ["--k", "0"], ["--damping", "nan"]):
        with pytest.raises(SystemExit):
            cli.run(_cache_args(store, tiny_llama, corpus, *flags))
        assert not store.exists() or not (store / "cli.json").exists()  # refused before anything is written
    config = tmp_path / "config.json"
    minimal = ["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus)]
    for values, match in (({"compile": "sometimes"}, r"compile must be one of \['auto', 'on', 'off', 'regional'\]"),
                          ({"limit": 1.5}, None),
                          ({"layers": [1]}, r"--layers patterns \['1'\] match no module"),
                          ({"batch_size": [2]}, "batch_size must be a single value"), ({"bogus": 1}, "unknown keys")):
        config.write_text(json.dumps(values))
        with pytest.raises(SystemExit, match=match):
            cli.run(["--config", str(config), *minimal])
        assert not (store / "cli.json").exists()
    config.write_text(json.dumps({"batch_size": "3", "layers": "model.layers.0.*", "compile": False}))  # strings parse as flags
    summary = cli.run(["--config", str(config), *_cache_args(store, tiny_llama, corpus)[:-3]])
    assert summary["layers"] == 7 and summary["compile"] == "off"
    config.write_text(json.dumps({"prompt": "a for", "generate": 2}))  # one prompt, not one per character
    results = cli.run(["--config", str(config), "attribute", "--store", str(store), "--out", str(tmp_path / "r")])
    assert [r.query["prompt"] for r in results] == ["a for"]


def test_query_and_store_files_are_checked(tiny_llama, tmp_path, corpus):
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus))
    prompts = tmp_path / "prompts.jsonl"
    for line, match in (('{"prompt": "a for", "completion": ""}', "'completion' must be a non-empty string"),
                        ('{"prompt": "a for", "completion": 3}', "'completion' must be a non-empty string"),
                        ('{"prompt": ""}', "non-empty string 'prompt'")):
        prompts.write_text(line + "\n")
        with pytest.raises(SystemExit, match=match):
            cli.run(["attribute", "--store", str(store), "--prompts", str(prompts)])
    with pytest.raises(SystemExit):
        cli.run(["attribute", "--store", str(store), "--prompt", ""])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="holds no records"):
        cli.run(["select", "--store", str(store), "--target", str(empty)])
    docs = store / "docs.jsonl"
    original = docs.read_text()
    docs.write_text("\n".join(original.splitlines()[1:]) + "\n")  # a line deleted
    with pytest.raises(StoreError, match="docs.jsonl is missing or was modified"):
        cli.run(["attribute", "--store", str(store), "--prompt", "a for"])
    docs.write_text(original)
    (store / "cli.json").write_text("[]")
    with pytest.raises(StoreError, match="not a grass-attribute configuration"):
        cli.run(["attribute", "--store", str(store), "--prompt", "a for"])
    with pytest.raises(FileNotFoundError, match="model folder not found: /nonexistent"):
        cli.run(_cache_args(tmp_path / "s2", "/nonexistent", corpus))


def test_main_prints_expected_errors_on_one_line(tmp_path, capsys):
    assert cli.main(["verify", "--store", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("grass-attribute: error: ")


def test_autocast_auto_is_recorded_resolved_and_normalize_is_a_scoring_choice(tiny_llama, tmp_path, corpus):
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus, "--autocast", "auto"))
    recorded = json.loads((store / "cli.json").read_text())["flags"]["autocast"]
    assert recorded == ("bfloat16" if llm.fast_bfloat16() else "none")
    assert cli.run(_cache_args(store, tiny_llama, corpus, "--autocast", recorded))["documents"] == 6  # the same store
    common = ["attribute", "--store", str(store), "--prompt", "a for", "--generate", "3", "--top-k", "6"]
    unit = cli.run([*common, "--normalize", "--out", str(tmp_path / "unit")])[0]
    raw = cli.run([*common, "--out", str(tmp_path / "raw")])[0]
    assert {d["id"] for d, _ in unit.helpful} == {d["id"] for d, _ in raw.helpful} == {f"d{i}" for i in range(6)}
    assert unit.harmful == raw.harmful == []  # every document is on top: none is listed again at the bottom
    assert sorted(s for _, s in unit.helpful) != sorted(s for _, s in raw.helpful)
    assert json.loads((tmp_path / "unit" / "report.json").read_text())["meta"]["normalize"] is True


def test_every_usage_error_exits_with_status_2(tiny_llama, tmp_path, corpus, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a for loop", "prompt": "a for", "completion": " loop"}) + "\n")
    dataset = ["cache", "--store", str(tmp_path / "s1"), "--model", tiny_llama, "--dataset", str(rows), "--no-compile"]
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus))
    for argv, message in (([*dataset, "--prompt-field", "prompt"], "--prompt-field and --completion-field go together"),
                          ([*dataset, "--corpus", str(corpus)], "give --corpus or --dataset, not both"),
                          (_cache_args(tmp_path / "s2", tiny_llama, corpus, "--split", "train"), "apply to --dataset"),
                          (["attribute", "--store", str(tmp_path / "none")], "is not a grass-attribute store"),
                          (["attribute", "--store", str(store)], "give --prompt, --prompts FILE or --task"),
                          (["select", "--store", str(store)], "select needs --target FILE or --task TASK")):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the model's loading bars, if it was loaded
        assert last.startswith("grass-attribute: error: ") and message in last and "Traceback" not in err, err


@pytest.mark.parametrize("flag, value", [("--project", "-5"), ("--nprobe", "0"), ("--nprobe", "-1"),
                                         ("--train-size", "0"), ("--memory-budget", "0")])
def test_index_flags_are_checked(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["index", "--store", str(tmp_path), flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err


def test_outputs_inside_the_store_are_refused(tiny_llama, tmp_path, corpus, capsys):
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus))
    before = store_files(store)
    target = tmp_path / "target.jsonl"
    target.write_text('{"text": "a for loop"}\n')
    for argv, out in ((["attribute", "--store", str(store), "--prompt", "a for", "--generate", "2"], store / "ckpt_000"),
                      (["select", "--store", str(store), "--target", str(target)], store / "docs.jsonl"),
                      (["bench", "--models"], store / "bench.json")):
        assert cli.main([*argv, "--out", str(out)]) == 2
        assert f"--out {out} lies inside the store {store}" in capsys.readouterr().err.splitlines()[-1]
    assert store_files(store) == before and cli.run(["verify", "--store", str(store)])["ok"]


@pytest.mark.parametrize("error, status", [(cli.CLIError("--k must match"), 2), (ValueError("bad input"), 2),
                                           (KeyError("a bug"), None)])
def test_another_ranks_error_exits_like_the_error_itself(monkeypatch, capsys, error, status):
    """Under torchrun a rank that did not fail raises RankFailed: a usage error or bad input there exits 2,
    anything else keeps its traceback."""
    def failed_elsewhere(argv):
        raise process_group.RankFailed(1, *process_group.RankFailed.describe(error))

    monkeypatch.setattr(cli, "run", failed_elsewhere)
    if status is None:
        with pytest.raises(process_group.RankFailed, match="rank 1 failed: KeyError"):
            cli.main([])
    else:
        assert cli.main([]) == status
        assert capsys.readouterr().err.startswith(f"grass-attribute: error: rank 1 failed: {type(error).__name__}: ")


def test_differing_flags_are_named_with_both_values(tiny_llama, tmp_path, corpus):
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus))
    with pytest.raises(SystemExit) as refused:
        cli.run(_cache_args(store, tiny_llama, corpus, "--k", "32", "--seed", "3"))
    message = str(refused.value.code)
    assert "--k cached 16, given 32" in message and "--seed cached 0, given 3" in message
    assert "--compressor" not in message and "--max-length" not in message  # only what differs, no flag dump
    assert cli.main(_cache_args(store, tiny_llama, corpus, "--k", "32")) == 2


def _scores_by_id(store, tmp_path, name):
    results = cli.run(["attribute", "--store", str(store), "--prompts", str(_prompts(tmp_path, "the")), "--top-k", "6",
                       "--out", str(tmp_path / f"{name}_report")])
    return {d["id"]: s for d, s in results[0].helpful}


def test_a_larger_limit_grows_the_store_as_a_fresh_cache_would(tiny_llama, tmp_path, corpus):
    store, fresh = tmp_path / "store", tmp_path / "fresh"
    # random masks; a damping that keeps the 6-document FIM's inverse from magnifying other batch shapes' rounding
    random_masks = ("--masks", "random", "--damping", "0.1*mean")
    first = cli.run(_cache_args(store, tiny_llama, corpus, "--limit", "3", *random_masks))
    cached_lines = (store / "docs.jsonl").read_text().splitlines()
    grown = cli.run(_cache_args(store, tiny_llama, corpus, "--limit", "all", *random_masks))
    assert (first["documents"], grown["documents"], grown["added_documents"]) == (3, 6, 3)
    lines = (store / "docs.jsonl").read_text().splitlines()
    assert lines[:3] == cached_lines and sorted(json.loads(line)["id"] for line in lines) == [f"d{i}" for i in range(6)]
    assert json.loads((store / "cli.json").read_text())["flags"]["limit"] is None
    before = snapshot(store)
    assert cli.run(_cache_args(store, tiny_llama, corpus, "--limit", "all", *random_masks))["added_documents"] == 0
    assert snapshot(store) == before  # grown and complete: nothing is written
    cli.run(_cache_args(fresh, tiny_llama, corpus, "--limit", "all", *random_masks))
    grown_scores, fresh_scores = _scores_by_id(store, tmp_path, "grown"), _scores_by_id(fresh, tmp_path, "fresh")
    assert list(grown_scores) == list(fresh_scores)  # the same ranking
    for doc, score in fresh_scores.items():  # the same scores, up to float32 rounding in other batch shapes
        assert grown_scores[doc] == pytest.approx(score, rel=2e-3), doc
    with pytest.raises(SystemExit, match=r"documents \['d\d'(, 'd\d')*\] of the store are not in the corpus \(a store only "
                                         "grows"):
        cli.run(_cache_args(store, tiny_llama, corpus, "--limit", "2", *random_masks))


def test_a_grown_store_keeps_its_energy_masks_and_resumes_an_interrupted_grow(tiny_llama, tmp_path, corpus):
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus, "--limit", "2", "--mask-documents", "2"))
    masks = snapshot(store / "masks")
    assert cli.run(_cache_args(store, tiny_llama, corpus, "--limit", "3", "--mask-documents", "2"))["added_documents"] == 1
    assert snapshot(store / "masks") == masks
    record = (store / "cli.json").read_text()
    extra = json.dumps({"id": "d9", "text": "a lambda expression"}) + "\n"
    (store / "docs.jsonl").write_text((store / "docs.jsonl").read_text() + extra)  # a grow stopped after docs.jsonl
    assert (store / "cli.json").read_text() == record
    grown = cli.run(_cache_args(store, tiny_llama, corpus, "--mask-documents", "2", "--limit", "all"))
    assert grown["documents"] == 6 and grown["added_documents"] == 3
    assert snapshot(store / "masks") == masks  # the stored gradients were compressed with them
    assert "d9" not in (store / "docs.jsonl").read_text()
    assert len(cli.run(["attribute", "--store", str(store), "--prompt", "a for", "--generate", "2", "--top-k", "6",
                        "--out", str(tmp_path / "r")])[0].helpful) == 6


def test_the_mask_pass_runs_under_the_cache_autocast_and_older_mask_records_stay(tiny_llama, tmp_path, corpus):
    """The energy-mask pass runs under --autocast and its record says so; a record from before (no "autocast": a
    float32 pass) is the same masks, so an older store resumes and grows with them rather than recomputing them."""
    from attribution.llm.commands.cache import _same_masks

    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus, "--autocast", "bfloat16", "--limit", "2", "--mask-documents", "2"))
    record = json.loads((store / "masks" / "masks.json").read_text())
    assert record["autocast"] == "bfloat16"
    older = {key: value for key, value in record.items() if key != "autocast"}
    assert _same_masks(older, record) and _same_masks(record, record)
    assert not _same_masks({**record, "autocast": "float16"}, record)
    assert not _same_masks(older, {**record, "k": record["k"] + 1})
    plain = tmp_path / "plain"
    cli.run(_cache_args(plain, tiny_llama, corpus, "--autocast", "none", "--limit", "2", "--mask-documents", "2"))
    assert json.loads((plain / "masks" / "masks.json").read_text())["autocast"] == "none"


def test_index_without_faiss_names_the_extra_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails as if it were not installed
    assert cli.main(["index", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'grass_ops[faiss]'" in err and "Traceback" not in err


def test_help_gives_every_flag_a_line_and_its_default():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in [("", parser), *commands.items()]:
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help line"
            formatter = sub._get_formatter()
            formatter.add_argument(action)
            shown = " ".join(formatter.format_help().split())  # the flag's lines in --help
            assert action.required or "default" in shown, f"{name}: no default in {shown!r}"


def test_the_usage_examples_use_stores_that_exist():
    """Every --store in the module's examples is the demo's store or one an earlier example caches."""
    demo_store = cli.build_parser().parse_args(["demo"]).store
    created = {demo_store}
    examples = [line.strip() for line in cli.__doc__.splitlines() if "grass-attribute" in line or "attribution.cli" in line]
    assert any(f"--store {demo_store}" in line for line in examples)
    for line in examples:
        store = re.search(r"--store (\S+)", line)
        if store is None:
            continue
        if re.search(r"\bcache\b", line):
            created.add(store.group(1))
        assert store.group(1) in created, line


def test_the_damping_flag_takes_a_number_or_a_factor_of_the_mean_and_records_it(tiny_llama, tmp_path, corpus, capsys):
    from attribution.llm.commands import flags

    assert flags.damping("0.01*mean") == "0.01*mean" and flags.damping(" 0.5 * mean") == "0.5*mean"
    assert flags.damping("0.001") == 0.001 and flags.damping("0") == 0.0
    for bad in ("nan", "-1", "inf", "abc", "0.1*median", "-0.1*mean", "x*mean"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number >= 0 or '<factor>\*mean'"):
            flags.damping(bad)
    store = tmp_path / "store"
    cli.run(_cache_args(store, tiny_llama, corpus, "--damping", "0.02*mean", "--masks", "random"))
    assert json.loads((store / "cli.json").read_text())["flags"]["damping"] == "0.02*mean"
    default = tmp_path / "default"
    cli.run(_cache_args(default, tiny_llama, corpus, "--masks", "random"))
    assert json.loads((default / "cli.json").read_text())["flags"]["damping"] == "0.005*mean"
    with pytest.raises(SystemExit):
        cli.run(_cache_args(store, tiny_llama, corpus, "--damping", "0.1*median"))
    assert "--damping: must be a number >= 0 or '<factor>*mean'" in capsys.readouterr().err


def test_the_demo_refuses_per_token_rows_in_its_mixed_curvature_and_a_task_weight_outside_0_1(tmp_path, capsys):
    """Refused before anything is loaded: --per-token would join the questions whose curvature the default mixes in,
    and a task weight of 1 (or more) would drop the training curvature."""
    out = ["demo", "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")]
    assert cli.build_parser().parse_args(["demo"]).task_weight == 0.5
    assert cli.build_parser().parse_args(["demo"]).checkpoints == "both"
    assert cli.build_parser().parse_args(["demo"]).answer == "true"
    assert cli.main([*out, "--per-token"]) == 2
    assert "--per-token adds each answer token's row" in capsys.readouterr().err
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(SystemExit):
            cli.main([*out, "--task-weight", bad])
        assert "--task-weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*out, "--answer", "gold"])
    assert "--answer: invalid choice: 'gold'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_the_demo_names_the_checkpoints_choice_that_an_older_store_was_cached_with(tmp_path, capsys):
    """A store of the old default (the tuned model alone: no --checkpoint recorded) or of another choice is refused
    before anything is loaded, naming the --checkpoints that reuses it."""
    store = tmp_path / "store"
    store.mkdir()
    for cached, choice, given in ((None, "tuned", []), ([str(tmp_path / "out" / "base_model")], "base", []),
                                  ([str(tmp_path / "out" / "base_model"), "model"], "both", ["--checkpoints", "tuned"])):
        (store / "cli.json").write_text(json.dumps({"flags": {"checkpoint": cached}, "corpus": {}}))
        assert cli.main(["demo", "--out", str(tmp_path / "out"), "--store", str(store), *given]) == 2
        err = capsys.readouterr().err
        assert f"was cached with --checkpoints {choice} (the default is now both): give --checkpoints {choice}" in err
        assert ("--task-weight 0" in err) == (choice == "tuned")
    assert not (tmp_path / "out").exists()
