"""`grass-attribute verify` on a finished CLI store: every file the store depends on (manifest, corpus,
configuration, masks, shards, records, derived data) is covered by a checksum, so an edit is reported
or leaves the scores unchanged."""
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from attribution.llm import cli  # noqa: E402

DOCS = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
        "python list data", "the function creates a list"]
PROMPTS = [{"prompt": "a for", "completion": " loop list"}, {"prompt": "the data", "completion": " privacy"}]


def _files(root) -> list[str]:
    """Every file of a store, relative to it, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory):
    """(store, prompts file, the scores report of the untouched store): FactGraSS with energy masks."""
    root = tmp_path_factory.mktemp("finished")
    corpus, prompts = root / "corpus.jsonl", root / "prompts.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(DOCS)))
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    store = root / "store"
    cli.run(["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus), "--k", "16",
             "--batch-size", "2", "--max-length", "8", "--layers", "model.layers.*", "--no-compile"])
    assert (store / "masks").is_dir()  # the default --masks energy writes them into the store
    return store, prompts, _scores(store, prompts, root / "report")


def _scores(store, prompts, out) -> list:
    cli.run(["attribute", "--store", str(store), "--prompts", str(prompts), "--top-k", str(len(DOCS)), "--out", str(out)])
    return json.loads((out / "report.json").read_text())["queries"]


def _verify(store, capsys) -> dict:
    """verify's printed report; its exit status is 0 exactly when the report is ok, 1 otherwise."""
    capsys.readouterr()
    try:
        cli.run(["verify", "--store", str(store)])
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    report = json.loads(capsys.readouterr().out)
    assert status == (0 if report["ok"] else 1)
    return report


def _copy(finished, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(finished[0], store)
    return store


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


EDITS = {
    "manifest.json": lambda store: _edit_json(store / "manifest.json", lambda m: m.update(seed=m["seed"] + 1)),
    "docs.jsonl": lambda store: (store / "docs.jsonl").write_text((store / "docs.jsonl").read_text().replace("loop", "pool")),
    "cli.json": lambda store: _edit_json(store / "cli.json", lambda c: c["flags"].update(damping=0.5)),
    "masks": lambda store: _flip_middle_byte(sorted((store / "masks").glob("*.npz"))[0]),
    "masks.json": lambda store: _edit_json(store / "masks" / "masks.json", lambda m: m.update(k=m["k"] + 1)),
    "fim/done.json": lambda store: _edit_json(store / "ckpt_000" / "fim" / "done.json",
                                              lambda d: d["meta"].update(damping=0.5)),
}


@pytest.mark.parametrize("edited", sorted(EDITS))
def test_verify_reports_an_edit_to_any_file_the_store_depends_on(finished, tmp_path, capsys, edited):
    store = _copy(finished, tmp_path)
    assert _verify(store, capsys)["ok"]
    EDITS[edited](store)
    report = _verify(store, capsys)
    assert not report["ok"]
    name = "masks" if edited == "masks" else edited.split("/")[-1]
    assert any(name in problem for problem in report["problems"]), report["problems"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_single_byte_edit_is_reported_or_changes_no_score(finished, tmp_path_factory, capsys, data):
    """Any byte of any file of a finished store, replaced by any other byte: verify reports it, or the
    store still serves exactly the scores it served before the edit."""
    store, prompts, expected = finished
    folder = tmp_path_factory.mktemp("edited")
    copy = folder / "store"
    shutil.copytree(store, copy)
    name = data.draw(st.sampled_from(_files(copy)), label="file")
    path = copy / name
    content = bytearray(path.read_bytes())
    if content:
        at = data.draw(st.integers(0, len(content) - 1), label="offset")
        content[at] ^= data.draw(st.integers(1, 255), label="xor mask")
    else:
        content = bytearray(data.draw(st.binary(min_size=1, max_size=4), label="bytes written into the empty file"))
    path.write_bytes(bytes(content))
    if _verify(copy, capsys)["ok"]:
        assert _scores(copy, prompts, folder / "report") == expected, f"{name}: verify passed, the scores changed"
