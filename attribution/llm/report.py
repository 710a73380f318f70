"""Report stage: each query with its most helpful and most harmful training documents, as
report.json, report.md and report.html (Jinja2 templates in ``attribution/llm/templates``).

The reports open with one screen that answers "did it work?" (per query: the answer, whether it is
right and the true source's rank when known, the top document), then explain the scores and the
metrics. Everything that comes from the corpus or the user (ids, prompts, completions, passages) is
escaped: HTML-escaped in the page (autoescape), Markdown-escaped in the .md (every ``{{ }}`` passes
through :func:`md_text`)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# Characters cut from a shortened text: passages in the per-query lists, the top document in the summary.
PASSAGE_CHARS = 280
SUMMARY_CHARS = 90

# (key in an evaluation row, column header, what it measures)
METRICS = (
    ("recall@1", "recall@1", "share of the questions whose true source document is ranked first"),
    ("recall@5", "recall@5", "share of the questions whose true source document is among the 5 highest scores"),
    ("mrr", "MRR", "mean reciprocal rank: the mean over the questions of 1 / the true source's rank (1: always "
                   "first; 0.5: second on average; near 0: far down the list)"),
    ("mrr_answered", "MRR (answered right)", "the MRR over only the questions the model answered correctly: there the "
                                             "answer comes from the planted fact, so its source should rank first"),
    *((f"tail_patch@{k}", f"tail-patch@{k}", f"influence (TrackStar's tail-patch): the mean over the questions of the change "
                                             f"in the log-probability of the model's answer (nats) after one training step "
                                             f"on the method's top {k} document{'s' if k > 1 else ''}, at the fine-tuning's "
                                             "learning rate and optimizer state; ± its standard error")
      for k in (1, 5, 10)),
    *((f"tail_patch@{k}_answered", f"tail-patch@{k} (answered right)", f"tail-patch@{k} over only the questions the "
                                                                      "model answered correctly (a wrong answer's true "
                                                                      "source can push that answer down by nats)")
      for k in (1, 5, 10)),
    *((f"tail_patch@{k}_true", f"tail-patch@{k} (true answer)", f"tail-patch@{k} on the planted fact's true answer "
                                                                "instead of the model's own, every question, after the "
                                                                "same steps (TrackStar's definition: does training on "
                                                                "the documents teach the fact)")
      for k in (1, 5, 10)),
)

# Readable labels of the report's configuration (meta) keys; other keys keep their name.
METHOD_NAMES = {"if": "influence function", "graddot": "gradient dot product", "gradcos": "gradient cosine",
                "tracin": "TracIn", "trak": "TRAK"}
SETUP_LABELS = {"model": "model", "method": "scoring",
                "compressor": "compressor", "k": "k (floats per layer)", "damping": "damping",
                "preconditioner": "preconditioner", "task_weight": "task weight (query share of the curvature)",
                "documents": "training documents", "top_k": "documents listed per query", "per_token": "per-token lists",
                "index": "ANN index candidates", "two_stage": "ranking", "answer": "answer attributed",
                "answered_correctly": "questions answered correctly",
                "cache_seconds": "cache seconds"}

ANSWER_TEXT = {"own": "the model's own answer", "true": "the planted fact's true answer"}  # `demo --answer`


@dataclass
class Attribution:
    """One query's result. ``query`` holds prompt and completion, and when known ``target`` (the
    true source's id), ``correct`` (whether the answer is right) and ``target_rank`` (1 = first)."""
    query: dict
    helpful: list[tuple[dict, float]]
    harmful: list[tuple[dict, float]]
    tokens: list[dict] | None = None  # per-token attribution: {token, position, helpful, harmful}


def shorten(text, width: int) -> str:
    """``text`` on one line, cut at the last word boundary within ``width`` characters with an ellipsis."""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    space = cut.rfind(" ")
    if space > width // 2:  # keep whole words unless one word is most of the width
        cut = cut[:space]
    return cut.rstrip(" ,;:.-") + "…"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#])")


def md_text(value) -> str:
    """``value`` as literal inline Markdown: one line, HTML's ``& < >`` as entities and Markdown's
    punctuation (backslash, backtick, ``* _ [ ] | ~ #``) backslash-escaped."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def format_score(value: float) -> str:
    """A score with its sign, three significant digits."""
    return f"{value:+.3g}"


def score_legend(meta: dict) -> list[str]:
    """What a score means (sign, scale, helpful vs harmful) for the report's method."""
    method, normalized = meta.get("method", "if"), bool(meta.get("normalize"))
    preconditioned = method in ("if", "trak") and meta.get("preconditioner") != "none"
    if method == "if" and not preconditioned:
        method = "graddot"  # IF without a preconditioner: the plain dot product
    what = {"if": "the influence estimate q · (F + λI)⁻¹ · g, with q the answer's compressed loss gradient, g the "
                  "document's, F their Fisher information matrix and λ the damping",
            "graddot": "the dot product q · g of the answer's and the document's compressed loss gradients",
            "gradcos": "the cosine of the answer's and the document's compressed loss gradients"}.get(
        method, f"the {method} score of the document for the answer")
    whitened = meta.get("preconditioner") in ("kfac-whitened", "ekfac-whitened")
    if method == "if" and whitened:
        kind = meta["preconditioner"].removesuffix("-whitened").upper()
        what = (f"the influence estimate C(P^-1/2 q) · C(P^-1/2 g), with q the answer's loss gradient, g the document's, "
                f"P + λI each layer's {kind} curvature with the damping λ, applied before the compression C "
                "(both sides whitened)")
    lines = [f"Score: {what}.",
             "Positive = helpful: a training step on the document lowers the loss of this answer (makes it more likely). "
             "Negative = harmful: a step on it raises that loss. The lowest-score list shows harmful documents when "
             "their scores are negative; a positive lowest score only means least helpful."]
    if normalized and whitened:
        lines.append("Scale: unit-normalized: the cosine of the two whitened gradients, between -1 and 1.")
    elif normalized and not preconditioned:
        lines.append("Scale: unit-normalized: the cosine of the two gradients, between -1 and 1.")
    elif normalized:
        lines.append("Scale: unit-normalized (--normalize): divided by both gradients' norms, so a long document with a "
                     "large gradient does not top every list; the preconditioner keeps the scores unbounded.")
    elif method == "gradcos":
        lines.append("Scale: between -1 and 1.")
    else:
        damping = " and shrink with the damping" if preconditioned else ""
        lines.append(f"Scale: no fixed unit (scores grow with the gradients' norms{damping}): "
                     "compare them within one report, not across stores or settings.")
    return lines


def two_stage_text(info: dict) -> str:
    """A two-stage ranking's setup line: its sources, their candidates per query, the distinct ones re-ranked."""
    counts = info.get("candidates") or []
    spread = f"{min(counts)}" if counts and min(counts) == max(counts) else f"{min(counts)} to {max(counts)}" if counts else "?"
    return (f"two-stage: the top {info.get('candidates_k')} documents of {' and '.join(map(str, info.get('sources', [])))} "
            f"per query ({spread} distinct candidates), re-ranked by the exact score")


def _setup(meta: dict) -> list[tuple[str, str]]:
    """(label, value) of the configuration, readable: the method with its scoring, seconds rounded."""
    def shown(key, value):
        if key == "method":
            return f"{METHOD_NAMES.get(value, value)}, {'unit-normalized' if meta.get('normalize') else 'raw'} scores"
        if key == "answer" and value in ANSWER_TEXT:
            return ANSWER_TEXT[value]
        if key == "two_stage" and isinstance(value, dict):
            return two_stage_text(value)
        if key.endswith("seconds") and isinstance(value, float):
            return f"{value:.0f}"
        return "yes" if value is True else "no" if value is False else str(value)

    return [(SETUP_LABELS.get(key, key), shown(key, value)) for key, value in meta.items()
            if value is not None and key not in ("job", "normalize")]


def _listed(rows, target) -> list[dict]:
    return [{"id": str(d["id"]), "score": format_score(s), "text": shorten(d["text"], PASSAGE_CHARS),
             "is_target": target is not None and str(d["id"]) == str(target)} for d, s in rows]


def _query_view(n: int, result: Attribution) -> dict:
    q = result.query
    target = q.get("target")
    helpful = _listed(result.helpful, target)
    top = helpful[0] if helpful else None
    return {"n": n, "prompt": str(q["prompt"]), "completion": str(q["completion"]),
            "answer": shorten(q.get("model_answer", q["completion"]), SUMMARY_CHARS),
            # the model's own answer where another completion is attributed (demo --answer true)
            "said": q["model_answer"] if q.get("model_answer", q["completion"]) != q["completion"] else None,
            "correct": q.get("correct"), "target": target,
            "target_rank": q.get("target_rank"), "helpful": helpful, "harmful": _listed(result.harmful, target),
            "top_id": top["id"] if top else None, "top_text": shorten(top["text"], SUMMARY_CHARS) if top else None,
            "tokens": [{"token": t["token"], "top": ", ".join(str(d["id"]) for d, _ in t["helpful"][:3])}
                       for t in result.tokens or []]}


def _verdict(views: list[dict], meta: dict, top_k: int) -> list[str]:
    """The summary's sentences: answers right, true sources found, and lists cut short by a small corpus."""
    lines = []
    checked = [v for v in views if v["correct"] is not None]
    if checked:
        lines.append(f"The model's answer is right for {sum(bool(v['correct']) for v in checked)} of {len(checked)} "
                     "questions.")
    ranked = [v for v in views if v["target_rank"] is not None]
    if ranked:
        first = sum(v["target_rank"] == 1 for v in ranked)
        listed = sum(v["target_rank"] <= top_k for v in ranked)
        lines.append(f"The true source document is ranked first for {first} of {len(ranked)} questions and among the "
                     f"top {top_k} for {listed} (marked ★ in the lists).")
    else:
        lines.append("No true source is known for these queries: judge whether the top documents explain each answer.")
    documents = meta.get("documents")
    if isinstance(documents, int) and documents < 2 * top_k:
        rest = max(documents - top_k, 0)
        lines.append(f"The corpus holds {documents} documents, fewer than 2·k = {2 * top_k}: each lowest-score list "
                     f"is limited to the documents not in its top list ({rest}), so no document is listed twice.")
    return lines


def _evaluation(evaluation: list[dict] | None) -> dict | None:
    if not evaluation:
        return None
    metrics = [m for m in METRICS if any(m[0] in row for row in evaluation)]

    def cell(row: dict, key: str) -> str:  # a value, with "± its standard error" where the row has one
        if row.get(key) is None:
            return "–"
        se = row.get(f"{key}_se")
        return f"{row[key]:.2f}" + ("" if se is None else f" ± {se:.2f}")

    rows = [{"method": str(row["method"]), "cells": [cell(row, key) for key, _, _ in metrics]} for row in evaluation]
    return {"headers": [label for _, label, _ in metrics], "legend": [(label, text) for _, label, text in metrics],
            "rows": rows}


def _environment(markdown: bool):
    from jinja2 import Environment, PackageLoader, StrictUndefined

    if markdown:  # every expression is escaped; the template's own text is the only Markdown
        return Environment(loader=PackageLoader("attribution.llm", "templates"), undefined=StrictUndefined,
                           autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                           finalize=lambda value: "" if value is None else md_text(value))
    return Environment(loader=PackageLoader("attribution.llm", "templates"), undefined=StrictUndefined, autoescape=True,
                       trim_blocks=True, lstrip_blocks=True)


def write_reports(out: str | Path, results: list[Attribution], meta: dict, evaluation: list[dict] | None = None,
                  plot: Path | None = None, notes: list[str] | None = None) -> dict[str, Path]:
    """report.json, report.md and report.html: the summary, the legends, an evaluation table (e.g.
    fact-tracing recall per method) and its plot when given, ``notes`` (plain text paragraphs), and
    each query's top and bottom documents (per token too when the results carry them)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "evaluation": evaluation, "notes": notes or [], "queries": [
        {"query": r.query, "helpful": _ranked(r.helpful), "harmful": _ranked(r.harmful),
         **({"tokens": [{"token": t["token"], "position": t["position"], "helpful": _ranked(t["helpful"]),
                         "harmful": _ranked(t["harmful"])} for t in r.tokens]} if r.tokens else {})} for r in results]}
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    views = [_query_view(n, r) for n, r in enumerate(results, start=1)]
    top_k = int(meta.get("top_k") or max((len(r.helpful) for r in results), default=0))
    context = {"meta": meta, "subtitle": meta.get("job"), "setup": _setup(meta), "verdict": _verdict(views, meta, top_k),
               "queries": views, "targets_known": any(v["target"] is not None for v in views),
               "checked": any(v["correct"] is not None for v in views), "score_legend": score_legend(meta),
               "evaluation": _evaluation(evaluation), "plot": Path(plot).name if plot is not None else None,
               "notes": notes or [], "top_k": top_k, "documents": meta.get("documents")}
    (out / "report.md").write_text(_environment(markdown=True).get_template("report.md.j2").render(context))
    (out / "report.html").write_text(_environment(markdown=False).get_template("report.html.j2").render(context))
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}


def _ranked(rows) -> list[dict]:
    return [{"id": d["id"], "score": s, "text": d["text"]} for d, s in rows]
