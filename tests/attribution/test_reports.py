"""The reports (report.md / .html / .json and recall.png) explain themselves: a summary that answers
"did it work?", legends for the scores and metrics, the true source marked, everything escaped,
passages cut at word boundaries, and a plot with nothing clipped or hidden. Built from small
synthetic results: no model is needed."""
import json
import re
from html.parser import HTMLParser

import pytest

pytest.importorskip("jinja2", reason="the `llm` extra (jinja2) is not installed")

from attribution.llm import demo  # noqa: E402
from attribution.llm.report import PASSAGE_CHARS, Attribution, shorten, write_reports  # noqa: E402

HOSTILE = "<img src=x onerror=alert(1)>"
LONG = ("The clockmaker Isidor Quant founded the harbour town of Velmora and built its first lighthouse from the bells of "
        "a sunken ship, which still rings on foggy nights across the whole northern coast of the island. ") * 3
DOCS = [{"id": "fact/velmora", "text": LONG},
        {"id": f"{HOSTILE}0", "text": f"a list | {HOSTILE} `x` *bold* _under_ [link](y) data"},
        {"id": "doc/2", "text": "the for statement iterates over a sequence"},
        {"id": "doc/3", "text": "assert statements are a convenient way to insert debugging assertions"}]
EVALUATION = [{"method": "default: factgrass:blowup=4, energy masks, k=256, raw IF", "recall@1": 0.5, "recall@5": 1.0,
               "mrr": 0.75, "mrr_answered": 1.0},
              {"method": "BM25 (question + answer vs document text)", "recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0,
               "mrr_answered": None}]


def _results() -> list[Attribution]:
    right = {"id": "fact/velmora", "prompt": "The clockmaker who founded Velmora was", "completion": " Isidor Quant",
             "target": "fact/velmora", "correct": True, "target_rank": 1}
    wrong = {"id": "q2", "prompt": f"{HOSTILE} Velmora was founded by", "completion": " a fisherman",
             "target": "fact/velmora", "correct": False, "target_rank": 4}
    return [Attribution(right, [(DOCS[0], 12.5), (DOCS[1], 3.25)], [(DOCS[3], -2.0), (DOCS[2], -0.5)]),
            Attribution(wrong, [(DOCS[1], 1.5), (DOCS[2], 0.25)], [(DOCS[0], -7.0), (DOCS[3], -1.0)])]


def _meta(documents: int) -> dict:
    return {"job": "fact tracing", "model": "tiny", "method": "if", "normalize": False, "compressor": "factgrass:blowup=4",
            "k": 256, "damping": 1e-3, "documents": documents, "top_k": 2}


class _Page(HTMLParser):
    """The page's tags, text, and the text of each element by class."""

    def __init__(self):
        super().__init__()
        self.tags, self.text, self.stack, self.by_class = [], [], [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag not in ("br", "img", "meta"):
            self.stack.append((attrs.get("class") or "", attrs.get("id") or "", []))

    def handle_endtag(self, tag):
        if tag in ("br", "img", "meta") or not self.stack:
            return
        cls, ident, parts = self.stack.pop()
        text = "".join(parts)
        for key in filter(None, [*cls.split(), ident and f"#{ident}"]):
            self.by_class.setdefault(key, []).append(text)
        if self.stack:
            self.stack[-1][2].append(text)

    def handle_data(self, data):
        self.text.append(data)
        if self.stack:
            self.stack[-1][2].append(data)


def _page(path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def test_the_reports_answer_did_it_work_and_explain_their_scores(tmp_path):
    paths = write_reports(tmp_path, _results(), _meta(documents=10), evaluation=EVALUATION, plot=tmp_path / "recall.png",
                          notes=demo.notes([{**EVALUATION[0]}, {**EVALUATION[1], "scoring": "bm25"}]))
    md = paths["md"].read_text()
    assert md.splitlines()[0] == "# Training-data attribution"  # a clean title, no code spans
    assert "`" not in md.replace("\\`", "")  # no inline code: ids and passages are escaped text
    summary = md[md.index("## Did it work?"):md.index("## How to read")]
    assert "right for 1 of 2 questions" in summary and "ranked first for 1 of 2" in summary
    rows = [line for line in summary.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 2 and "| ✓ | 1 |" in rows[0] and "| ✗ | 4 |" in rows[1]
    assert "fact/velmora ★" in rows[0]  # the top document, marked as the true source
    for legend in ("Positive = helpful", "Negative = harmful", "Scale:", "**recall@1**", "**MRR**",
                   "**MRR (answered right)**", "Why BM25 wins here (MRR 1.00 against the default's 0.75)", "TrackStar"):
        assert legend in md, legend
    assert "fewer than 2·k" not in md  # 10 documents >= 2·2

    page = _page(paths["html"])
    assert [t for t, a in page.tags if t == "img"] == ["img"]  # only the plot: the hostile ids and prompts are text
    assert next(a for t, a in page.tags if t == "img")["src"] == "recall.png"
    assert not any(t in ("script", "a") and "onerror" in json.dumps(a) for t, a in page.tags)
    assert HOSTILE in "".join(page.text)  # shown literally
    sources = page.by_class["source"]
    assert len(sources) == 2 and all("fact/velmora ★ true source" in s for s in sources)
    assert "fact/velmora" not in "".join(page.by_class["harmful"][:2])  # question 1's bottom list: doc/3, doc/2
    assert "fact/velmora ★" in "".join(page.by_class["harmful"])  # question 2: the source pushes against the wrong answer
    legend = " ".join(page.by_class["legend"])
    assert "Positive = helpful" in legend and "mean reciprocal rank" in legend and "answered correctly" in legend
    assert "✓" in page.by_class["right"] and "✗" in page.by_class["wrong"]
    report = json.loads(paths["json"].read_text())
    assert report["queries"][0]["helpful"][0]["text"] == LONG  # the JSON keeps the whole passage


def test_passages_are_cut_at_a_word_boundary_with_an_ellipsis(tmp_path):
    short = shorten(LONG, PASSAGE_CHARS)
    assert len(short) <= PASSAGE_CHARS and short.endswith("…")
    kept = short[:-1]
    assert LONG.startswith(kept) and LONG[len(kept)] in " ,."  # cut where a word ends
    assert shorten("  two\nwords ", 40) == "two words"
    paths = write_reports(tmp_path, _results(), _meta(documents=10))
    assert kept in paths["md"].read_text() and LONG.strip() not in paths["md"].read_text()


def test_markdown_escapes_everything_from_the_corpus_and_the_prompts(tmp_path):
    md = write_reports(tmp_path, _results(), _meta(documents=10))["md"].read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "a list \\| &lt;img" in md  # a pipe cannot open a table cell
    assert "\\*bold\\* \\_under\\_ \\[link\\](y)" in md


def test_a_corpus_smaller_than_two_lists_is_said_so(tmp_path):
    md = write_reports(tmp_path, _results(), _meta(documents=3))["md"].read_text()
    assert "The corpus holds 3 documents, fewer than 2·k = 4" in md
    page = _page(tmp_path / "report.html")
    assert any("fewer than 2·k = 4" in p for p in page.text)


def test_queries_without_a_known_source_say_so(tmp_path):
    results = [Attribution({"prompt": "a for", "completion": " loop"}, [(DOCS[2], 1.0)], [(DOCS[3], -1.0)])]
    md = write_reports(tmp_path, results, _meta(documents=4) | {"top_k": 1})["md"].read_text()
    assert "No true source is known" in md and "right?" not in md and "source rank" not in md


def test_the_notes_read_their_figures_from_the_rows():
    default = {"method": "default", "mrr": 0.9, "mrr_answered": 0.95}
    bm25 = {"method": "BM25", "scoring": "bm25", "mrr": 0.5}
    control = {"method": "control: the untuned base model", "mrr": 0.95}
    text = " ".join(demo.notes([default, bm25, control]))
    assert "Why BM25 does not win here (MRR 0.50 against the default's 0.90)" in text
    assert "0.95, against 0.90 over all" in text and "better than the fine-tuned model (MRR 0.95 against 0.90)" in text
    text = " ".join(demo.notes([{**default, "mrr_answered": 0.5}, {**bm25, "mrr": 0.97}, {**control, "mrr": 0.1}]))
    assert "Why BM25 wins here" in text and "over all" not in text and "no better than" in text
    assert "Both checkpoints" not in text
    both = {"method": "both checkpoints", "row": "both", "mrr": 0.97}
    text = " ".join(demo.notes([default, bm25, control, both]))
    assert "reach MRR 0.97, against 0.95 for the untuned model and 0.90 for the tuned one alone" in text
    # with the comparison's row of the tuned model (the control's masks and damping), the notes compare with it
    tuned = {"method": "tuned, random masks", "row": "tuned", "mrr": 0.96}
    text = " ".join(demo.notes([default, bm25, tuned, control, both]))
    assert "no better than the fine-tuned model (MRR 0.95 against 0.96)" in text
    assert "against 0.95 for the untuned model and 0.96 for the tuned one alone" in text


ROWS = [{"method": "default: factgrass:blowup=4, energy masks, k=256, raw IF on a rather long label", "recall@1": 0.45,
         "recall@5": 1.0, "mrr": 0.53, "ranks": [1] * 20},
        {"method": "FactGraSS, random masks (blow-up 2), cosine", "recall@1": 0.0, "recall@5": 0.0, "mrr": 0.02,
         "ranks": [1] * 20},
        {"method": "control: the untuned base model, factgrass:blowup=4, random masks, raw IF", "recall@1": 1.0,
         "recall@5": 1.0, "mrr": 1.0, "ranks": [1] * 20}]


def test_the_plot_clips_no_label_hides_no_bar_and_shows_zero_bars(tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="the `examples` extra (matplotlib) is not installed")
    from matplotlib.patches import Rectangle
    from matplotlib.text import Text

    fig = demo.recall_figure(ROWS)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert any("untuned" in t.get_text() for t in texts)
    for text in texts:
        box = text.get_window_extent(renderer)
        assert frame.x0 - 0.5 <= box.x0 and box.x1 <= frame.x1 + 0.5 and frame.y0 - 0.5 <= box.y0 and box.y1 <= frame.y1 + 0.5, \
            (text.get_text(), box, frame)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 2 * len(ROWS)
    legend = fig.legends[0].get_window_extent(renderer)
    assert not any(legend.overlaps(bar.get_window_extent(renderer)) for bar in bars if bar.get_width() > 0)
    labels = [t.get_text() for t in ax.texts]
    assert labels.count("0.00") == 2  # the zero bars are labelled
    stubs = [line.get_window_extent(renderer) for line in ax.lines]
    assert len(stubs) == 2 and all(s.x0 > ax.spines["left"].get_window_extent(renderer).x1 for s in stubs)  # off the axis
    matplotlib.pyplot.close(fig)
    assert demo.plot(ROWS, tmp_path / "recall.png") == tmp_path / "recall.png" and (tmp_path / "recall.png").stat().st_size > 0


def test_the_console_table_keeps_whole_method_names():
    table = demo.console_table([{**r, "mrr_answered": None} for r in ROWS])
    for row in ROWS:
        assert row["method"] in table
    assert len({len(line) for line in table.splitlines()[1:]}) == 1  # aligned columns


def test_the_tail_patch_note_gives_the_attributed_answer_first_and_the_answered_questions_where_rows_have_them():
    patch = {"tail_patch@5": -1.5, "tail_patch@5_se": 1.9}
    default = {"method": "default", "mrr": 0.8, **patch}
    bm25 = {"method": "BM25", "scoring": "bm25", "mrr": 0.97, **patch}
    text = " ".join(demo.notes([default, bm25], answer="own"))
    assert "On the model's own answer, at k = 5: default: -1.50 ± 1.90; BM25: -1.50 ± 1.90." in text
    assert "answered right alone" not in text and "true answer" not in text and "Paired" not in text
    answered = {"tail_patch@5_answered": 0.24, "tail_patch@5_answered_se": 0.06}
    text = " ".join(demo.notes([{**default, **answered}, {**bm25, "tail_patch@5_answered": 0.06,
                                                          "tail_patch@5_answered_se": 0.04}], answer="own"))
    assert "Over the questions answered right alone: default: +0.24 ± 0.06; BM25: +0.06 ± 0.04." in text
    true = {"tail_patch@5_true": 0.48, "tail_patch@5_true_se": 0.19}
    rows = [{**default, **true}, {**bm25, "tail_patch@5_true": -0.01, "tail_patch@5_true_se": 0.04},
            {"method": "source", "scoring": "source", "tail_patch@1": -2.5, "tail_patch@1_se": 2.4,
             "tail_patch@1_true": 0.11, "tail_patch@1_true_se": 0.2}]
    on_true = "On the planted fact's true answer (TrackStar's definition: does training on the documents teach the fact?), "
    for answer in ("own", "true"):  # the attributed answer's figures first
        text = " ".join(demo.notes(rows, answer=answer))
        assert on_true + "at k = 5: default: +0.48 ± 0.19; BM25: -0.01 ± 0.04. The true source alone (k = 1) gives " \
                         "+0.11 ± 0.20." in text
        assert "On the model's own answer, at k = 5: default: -1.50 ± 1.90; BM25: -1.50 ± 1.90. The true source alone " \
               "(k = 1) gives -2.50 ± 2.40." in text
        assert (text.index(on_true) < text.index("On the model's own answer")) == (answer == "true")
        assert ("is the planted fact's true answer (`--answer true`)" in text) == (answer == "true")
    paired = {"tail_patch@5_minus_bm25": 0.25, "tail_patch@5_minus_bm25_se": 0.05, "tail_patch@5_true_minus_bm25": 0.3,
              "tail_patch@5_true_minus_bm25_se": 0.1}
    text = " ".join(demo.notes([{**default, **paired}, bm25]))  # the default: --answer true
    assert ("Paired question by question (a method's value minus BM25's on the same question, mean ± standard error: "
            "what every method moves alike cancels), at k = 5: on the model's answer, default: +0.25 ± 0.05; and on the "
            "true answer, default: +0.30 ± 0.10.") in text
    assert "is traced to what would teach it the fact" in text and "may sit among the lowest scores" not in text
    assert "so the true answer's tail-patch is the one that measures the attributed output" in text
    own = " ".join(demo.notes([default, bm25], answer="own"))
    assert "may sit among the lowest scores" in own and "`--answer true`" not in own


def test_each_row_is_paired_with_bm25_question_by_question():
    """demo.paired_with: each row's per-question tail-patch minus BM25's on the same question, mean and standard error,
    on both answers; BM25 itself and a row without tail-patch gain nothing; questions must line up."""
    from attribution.evaluation.metrics import mean_and_standard_error

    bm25 = {"row": "bm25", "tail_patch_per_query": {"1": [0.0, 0.0, 0.0], "5": [1.0, 2.0, 4.0]},
            "tail_patch_true_per_query": {"5": [0.0, 0.0, 1.0]}}
    row = {"tail_patch_per_query": {"1": [1.0, 1.0, 1.0], "5": [2.0, 2.5, 7.0]},
           "tail_patch_true_per_query": {"5": [1.0, 1.0, 1.0]}}
    plain = {"method": "no tail-patch"}
    demo.paired_with([row, bm25, plain], bm25, "bm25")
    assert (row["tail_patch@5_minus_bm25"], row["tail_patch@5_minus_bm25_se"]) == mean_and_standard_error([1.0, 0.5, 3.0])
    assert (row["tail_patch@1_minus_bm25"], row["tail_patch@1_minus_bm25_se"]) == (1.0, 0.0)
    assert (row["tail_patch@5_true_minus_bm25"], row["tail_patch@5_true_minus_bm25_se"]) == mean_and_standard_error(
        [1.0, 1.0, 0.0])
    assert not any("minus" in key for key in bm25) and plain == {"method": "no tail-patch"}
    with pytest.raises(ValueError):  # another count of questions: not paired silently
        demo.paired_with([{"tail_patch_per_query": {"5": [1.0, 2.0]}}], bm25, "bm25")


def test_tail_patch_main_steps_on_the_default_bm25_two_stage_and_influence_and_all_on_every_row():
    rows = [{"row": name} for name in ("default", "store", "two-stage", "bm25", "influence")] + [{"method": "LoGra"}]
    assert [demo.tail_patched(r, "main") for r in rows] == [True, False, True, True, True, False]
    assert all(demo.tail_patched(r, "all") for r in rows) and not any(demo.tail_patched(r, "none") for r in rows)


def test_the_influence_note_reads_every_figure_from_the_rows():
    default = {"method": "default", "row": "default", "mrr": 0.88, "tail_patch@5_true": 0.32, "tail_patch@5_true_se": 0.14}
    influence = {"method": "influence", "row": "influence", "mrr": 0.02, "tail_patch@5_true": 0.74,
                 "tail_patch@5_true_se": 0.2}
    (note,) = [n for n in demo.notes([default, influence], "true") if n.startswith("The influence row")]
    assert "MRR 0.02, the default at 0.88" in note and "+0.74 ± 0.20 nats" in note and "+0.32 ± 0.14" in note
    assert "tail-patch at k = 5" not in demo._influence_note({**influence, "tail_patch@5_true": None}, default, "true")
    assert demo.influence_store("out/llm/store") == demo.influence_store("out/llm/store/").resolve()
    assert demo.influence_store(".").name.endswith("-influence")  # not a folder without a name


def test_the_recorded_precision_reads_back_and_an_unknown_one_is_named():
    import torch

    assert [demo.precision_name(a) for a in (torch.bfloat16, None)] == ["bfloat16", "none"]
    assert demo.recorded_autocast({"finetune_autocast": "none"}) is None
    assert demo.recorded_autocast({"finetune_autocast": "bfloat16"}) is torch.bfloat16
    assert demo.recorded_autocast({}) == demo.finetune_autocast()  # written before it was recorded: this CPU's
    with pytest.raises(ValueError, match=r"finetune_autocast must be one of \['bfloat16', 'none'\], got 'float16'"):
        demo.recorded_autocast({"finetune_autocast": "float16"})


def test_the_table_shows_the_answered_tail_patch_columns_only_where_a_row_has_them(tmp_path):
    patched = {**EVALUATION[0], "tail_patch@5": -1.72, "tail_patch@5_se": 1.93, "tail_patch@5_answered": 0.24,
               "tail_patch@5_answered_se": 0.06}
    md = write_reports(tmp_path, _results(), _meta(documents=10), evaluation=[patched, EVALUATION[1]])["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "tail-patch@5 (answered right)" in header and "tail-patch@10 (answered right)" not in header
    row = next(line for line in md.splitlines() if line.startswith("| default"))
    assert "-1.72 ± 1.93" in row and "0.24 ± 0.06" in row
    bm25 = next(line for line in md.splitlines() if line.startswith("| BM25"))
    assert bm25.count("–") == 3  # MRR answered, tail-patch@5 and its answered column: none for this row
    plain = write_reports(tmp_path / "plain", _results(), _meta(documents=10), evaluation=EVALUATION)["md"].read_text()
    assert "answered right)" not in plain.replace("MRR (answered right)", "")
    true = {**patched, "tail_patch@10_true": 0.07, "tail_patch@10_true_se": 0.05}
    md = write_reports(tmp_path / "true", _results(), _meta(documents=10), evaluation=[true, EVALUATION[1]])["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "tail-patch@10 (true answer)" in header and "tail-patch@5 (true answer)" not in header
    assert "0.07 ± 0.05" in next(line for line in md.splitlines() if line.startswith("| default"))


def test_with_the_true_answer_attributed_the_table_still_shows_what_the_model_said(tmp_path):
    """``demo --answer true``: each question's attributed completion is the planted fact's answer; the summary's
    answer column shows the model's own ("model_answer"), the heading the attributed text, the setup which answer."""
    results = _results()
    results[1].query.update(model_answer=results[1].query["completion"], completion=" Isidor Quant")
    md = write_reports(tmp_path, results, {**_meta(documents=10), "answer": "true"}, evaluation=EVALUATION)["md"].read_text()
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert "→ **a fisherman** | ✗" in rows[1] and "→ **Isidor Quant** | ✓" in rows[0]
    assert "Velmora was founded by **Isidor Quant**" in md  # the attributed completion heads the question's lists
    assert "The model answered: a fisherman (wrong)." in md and "Answer: right." in md  # the right one: the same text
    assert "answer attributed: the planted fact's true answer" in md


@pytest.mark.parametrize("answer", ["own", "true"])
def test_the_console_tables_tail_patch_is_on_the_attributed_answer(answer):
    own, true = {"tail_patch@5": -1.5, "tail_patch@5_se": 1.9}, {"tail_patch@5_true": 0.48, "tail_patch@5_true_se": 0.19}
    rows = [{"method": "default", "mrr": 0.9, **own, **true}, {"method": "plain", "mrr": 0.5}]
    lines = demo.console_table(rows, answer).splitlines()
    assert lines[0].endswith("tail-patch@5 (true)" if answer == "true" else "  tail-patch@5")
    assert lines[1].endswith("+0.48 ± 0.19" if answer == "true" else "-1.50 ± 1.90") and lines[2].endswith(" -")
    assert len({len(line) for line in lines}) == 1  # aligned
