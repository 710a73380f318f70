"""LLM inputs: Hugging Face datasets (files, save_to_disk folders, prompt/completion, chat messages),
per-token queries, and the fact-tracing utilities."""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")
datasets = pytest.importorskip("datasets", reason="the `llm` extra is not installed")

from attribution import Attributor, facts, llm  # noqa: E402
from attribution.llm import cli  # noqa: E402

ROWS = [{"id": "a", "text": "the data privacy statement", "prompt": "a for", "completion": " loop list"},
        {"id": "b", "text": "lambda expression creates function", "prompt": "the", "completion": " data list"},
        {"id": "c", "text": "assert statement python", "prompt": "python", "completion": " list"}]


@pytest.mark.parametrize("form", ["jsonl", "parquet", "save_to_disk"])
def test_datasets_in_every_form(tmp_path, form):
    data = datasets.Dataset.from_list(ROWS)
    if form == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif form == "parquet":
        path = tmp_path / "rows.parquet"
        data.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(path))
    docs = llm.read_dataset(path, limit=2)
    assert [d["id"] for d in docs] == ["a", "b"] and docs[0]["text"] == "the data privacy statement"
    pairs = llm.read_dataset(path, prompt_field="prompt", completion_field="completion")
    assert pairs[2] == {"id": "c", "prompt": "python", "completion": " list", "text": "python list"}
    with pytest.raises(ValueError, match=r"no column\(s\) \['body'\]"):
        llm.read_dataset(path, text_field="body")


def test_prompt_completion_documents_only_score_their_completion(tiny_llama):
    model, tok = llm.load_model(tiny_llama)
    doc = {"id": "x", "prompt": "the data", "completion": " privacy statement", "text": "the data privacy statement"}
    (ids, targets), = llm.document_tokens(tok, [doc], 8)
    assert targets == [0, 0, 1, 1] and len(ids) == 4


def test_chat_messages_are_rendered_with_the_template(tiny_llama):
    _, tok = llm.load_model(tiny_llama)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant:{% endif %}"
    doc = llm.chat_document(tok, [{"role": "user", "content": "a for"}, {"role": "assistant", "content": "loop"}], "row 0")
    assert doc["prompt"] == "user: a for\nassistant:" and doc["completion"].strip() == "loop"
    with pytest.raises(ValueError, match="messages must be a list"):
        llm.chat_document(tok, "hello", "row 1")


def test_cli_caches_a_dataset(tiny_llama, tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    store = tmp_path / "store"
    summary = cli.run(["cache", "--store", str(store), "--model", tiny_llama, "--dataset", str(path), "--prompt-field",
                       "prompt", "--completion-field", "completion", "--k", "8", "--max-length", "8", "--no-compile"])
    assert summary["documents"] == 3
    with pytest.raises(SystemExit, match="give --corpus or --dataset"):
        cli.run(["cache", "--store", str(tmp_path / "s2"), "--model", tiny_llama, "--dataset", str(path), "--corpus",
                 "python-docs", "--no-compile"])


def test_per_token_queries_sum_to_the_whole_completion(tiny_llama, tmp_path):
    model, tok = llm.load_model(tiny_llama)
    model = model.double()
    query = {"id": "q", "prompt": "the data", "completion": " privacy statement list"}
    per_token = llm.per_token_queries(tok, query, 16)
    assert [t["position"] for t in per_token] == [0, 1, 2] and [t["token"].strip() for t in per_token] == [
        "privacy", "statement", "list"]
    docs = [{"id": str(i), "text": t} for i, t in enumerate(["the data privacy", "a lambda expression creates",
                                                              "for loop list", "assert statement python"])]
    batches, _ = llm.document_batches(tok, docs, 2, 8)
    attr = Attributor(model, llm.sequence_loss, method="graddot", compressor="identity", k=10**6,
                      layers=["model.layers.*"], dtype=torch.float64, compile=False, progress=False).cache(batches)
    whole = attr.attribute(llm.query_batches(tok, [query], None, 16))
    tokens = attr.attribute(llm.query_batches(tok, per_token, None, 16))
    torch.testing.assert_close(tokens.sum(0, keepdim=True), whole, rtol=1e-6, atol=1e-8)  # linear (Llama norms: float32)


def test_cli_per_token_report(tiny_llama, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(
        ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement"])))
    store = tmp_path / "store"
    cli.run(["cache", "--store", str(store), "--model", tiny_llama, "--corpus", str(corpus), "--k", "8", "--max-length",
             "8", "--no-compile"])
    results = cli.run(["attribute", "--store", str(store), "--prompt", "a for", "--generate", "3", "--top-k", "2",
                       "--per-token", "--out", str(tmp_path / "r")])
    assert len(results[0].tokens) == len(llm.query_tokens(llm.load_model(tiny_llama)[1], results[0].query, 8)[1]) - \
        llm.query_tokens(llm.load_model(tiny_llama)[1], results[0].query, 8)[1].count(0)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(report["queries"][0]["tokens"]) == len(results[0].tokens)
    assert 'class="t"' in (tmp_path / "r" / "report.html").read_text()  # the per-token spans


def test_retrieval_metrics_and_bm25():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.8], [0.3, 0.3, 0.3]], dtype=torch.float64)
    m = facts.retrieval_metrics(scores, ["a", "b", "c"], ["a", "a", "c"])
    assert m["ranks"] == [1, 2, 3]  # ties go to the lower index, so c (last) ranks 3rd among equals
    assert m["recall@1"] == pytest.approx(1 / 3) and m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    bm = facts.bm25_scores(["velmora founder"], ["the town of velmora", "a bridge", "founder of a club"])
    assert bm.shape == (1, 3) and bm[0, 1] == 0 and bm[0, 0] > 0


def test_the_fact_corpus_plants_every_fact_once():
    base = [{"id": f"doc/{i}", "text": f"paragraph {i}"} for i in range(30)]
    corpus = facts.fact_corpus(base)
    ids = [d["id"] for d in corpus]
    assert len(corpus) == 50 and len(set(ids)) == 50 and all(f.id in ids for f in facts.FACTS)
    for f in facts.FACTS:  # the question is a paraphrase: no sentence of the document is repeated
        assert f.question.lower().rstrip("?") not in f.text.lower() and f.answer.lower() in f.text.lower()


@pytest.mark.parametrize("form", ["parquet", "single saved Dataset"])
def test_a_split_the_dataset_does_not_have_is_refused(tmp_path, form):
    data = datasets.Dataset.from_list(ROWS)
    if form == "parquet":
        path = tmp_path / "rows.parquet"
        data.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        data.save_to_disk(str(path))
    with pytest.raises(ValueError, match=f"--dataset {path}.*no split 'validation'"):
        llm.read_dataset(path, split="validation")
    assert len(llm.read_dataset(path)) == 3


@pytest.mark.parametrize("form", ["empty.jsonl", "empty.csv", "empty.parquet", "0-row split"])
def test_an_empty_dataset_names_the_file_and_split(tmp_path, form):
    path, split = tmp_path / form, None
    if form == "empty.parquet":
        datasets.Dataset.from_list(ROWS).select([]).to_parquet(str(path))
    elif form == "0-row split":
        path, split = tmp_path / "saved", "validation"
        data = datasets.Dataset.from_list(ROWS)
        datasets.DatasetDict({"train": data, "validation": data.select([])}).save_to_disk(str(path))
    else:
        path.write_text("")
    with pytest.raises(ValueError, match=f"--dataset {path}.*split '{split or 'train'}'.*no rows"):
        llm.read_dataset(path, split=split)


def test_messages_and_prompt_completion_fields_exclude_each_other(tiny_llama, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({**r, "messages": [{"role": "user", "content": r["text"]}]}) for r in ROWS))
    store = tmp_path / "store"
    for fields in (["--prompt-field", "prompt", "--completion-field", "completion"], ["--prompt-field", "prompt"]):
        argv = ["cache", "--store", str(store), "--model", tiny_llama, "--dataset", str(path), "--messages-field",
                "messages", *fields, "--no-compile"]
        assert cli.main(argv) == 2
        assert "--messages-field excludes --prompt-field and --completion-field" in capsys.readouterr().err.splitlines()[-1]
        assert not store.exists()


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_the_chunked_loss_equals_the_whole_logits_loss_with_its_gradients(tiny_llama, chunk):
    model, tok = llm.load_model(tiny_llama)
    model = model.double()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    docs = [{"id": "a", "text": "the data privacy statement"}, {"id": "b", "text": "a for loop"},
            {"id": "q", "prompt": "lambda expression", "completion": " creates function"}]  # padded; a completion only
    (batch,), _ = llm.document_batches(tok, docs, 3, 16, pad_multiple=1)
    assert (batch["loss_mask"] == 0).any()
    params = list(model.parameters())
    want = llm.sequence_loss(model, batch)
    got = llm.chunked_sequence_loss(model, batch, chunk)
    assert got.shape == want.shape == (3,) and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), params), torch.autograd.grad((want * weights).sum(), params)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(llm.chunked_sequence_loss(model, batch, chunk), want, rtol=1e-12, atol=1e-12)


def test_the_chunked_loss_refuses_a_bad_chunk_and_falls_back_for_other_heads(tiny_llama):
    model, tok = llm.load_model(tiny_llama)
    (batch,), _ = llm.document_batches(tok, [{"id": "a", "text": "the data privacy statement"}], 1, 16, pad_multiple=1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="chunk_tokens must be a positive number of positions"):
            llm.chunked_sequence_loss(model, batch, bad)

    class Scaled(torch.nn.Module):  # a head the chunked form does not know: the whole-logits loss
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = out.logits * 2.0
            return out

    scaled = Scaled(model)
    assert torch.equal(llm.chunked_sequence_loss(scaled, batch, 2), llm.sequence_loss(scaled, batch))
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append("whole model"))
    try:
        llm.chunked_sequence_loss(model, batch, 2)  # a Llama: decoder and head, never the whole model's forward
        assert calls == []
        llm.chunked_sequence_loss(scaled, batch, 2)  # any other class: its own forward
        assert calls == ["whole model"]
    finally:
        hook.remove()
