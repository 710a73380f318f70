"""Report stage: each query with its most helpful and most harmful training documents, as
report.json, report.md and report.html. Every field that comes from the corpus or the user (ids,
prompts, completions, passages) is escaped: HTML-escaped in the page, code-spanned in Markdown."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Attribution:
    query: dict
    helpful: list[tuple[dict, float]]
    harmful: list[tuple[dict, float]]
    tokens: list[dict] | None = None  # per-token attribution: {token, position, helpful, harmful}


def md_code(text) -> str:
    """Inline Markdown code span that shows ``text`` literally (backticks, pipes, HTML and all)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "`"
    while fence in text:
        fence += "`"
    return f"{fence} {text} {fence}"


def _ranked(rows) -> list[dict]:
    return [{"id": d["id"], "score": s, "text": d["text"]} for d, s in rows]


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_reports(out: str | Path, results: list[Attribution], meta: dict, evaluation: list[dict] | None = None,
                  plot: Path | None = None) -> dict[str, Path]:
    """report.json, report.md and report.html with each prompt, completion and its top passages; per-token
    attributions when the results carry them; an evaluation table (e.g. fact-tracing recall per method)
    and its plot when given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "evaluation": evaluation, "queries": [
        {"query": r.query, "helpful": _ranked(r.helpful), "harmful": _ranked(r.harmful),
         **({"tokens": [{"token": t["token"], "position": t["position"], "helpful": _ranked(t["helpful"]),
                         "harmful": _ranked(t["harmful"])} for t in r.tokens]} if r.tokens else {})} for r in results]}
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    e = html.escape
    md = [f"# Training-data attribution ({md_code(meta.get('method', 'if'))}, {md_code(meta.get('compressor', ''))}, "
          f"k={md_code(meta.get('k'))})", ""]
    page = ["<html><head><meta charset='utf-8'><title>grass_ops attribution</title><style>body{font-family:sans-serif;"
            "max-width:60em;margin:auto} .p{border-left:4px solid #2a7;padding:.3em .8em;margin:.4em 0}"
            " .n{border-color:#c33} .s{color:#666;font-size:.85em} .t{background:#eef;margin:0 1px;border-bottom:2px solid #88c}"
            " td,th{padding:.2em .6em;text-align:left}</style></head><body>",
            f"<h1>Training-data attribution</h1><p class='s'>{e(json.dumps(meta))}</p>"]
    if evaluation:
        columns = [c for c in ("method", "recall@1", "recall@5", "mrr", "mrr_answered") if c in evaluation[0]]
        md += ["## Evaluation", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        md += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in evaluation]
        page.append("<h2>Evaluation</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>")
        page += ["<tr>" + "".join(f"<td>{e(_cell(row[c]))}</td>" for c in columns) + "</tr>" for row in evaluation]
        page.append("</table>")
        if plot is not None:
            md += ["", f"![recall per method]({Path(plot).name})"]
            page.append(f"<img src='{e(Path(plot).name)}' alt='recall per method' style='max-width:100%'>")
        md.append("")
    for r in results:
        md += [f"## Prompt: {md_code(r.query['prompt'])}", "", f"**Completion:** {md_code(r.query['completion'])}", "",
               "| | score | id | passage |", "|---|---|---|---|"]
        md += [f"| + | {s:.4g} | {md_code(d['id'])} | {md_code(d['text'][:300])} |" for d, s in r.helpful]
        md += [f"| - | {s:.4g} | {md_code(d['id'])} | {md_code(d['text'][:300])} |" for d, s in r.harmful]
        if r.tokens:
            md += ["", "| token | most helpful documents |", "|---|---|"]
            md += [f"| {md_code(t['token'])} | {', '.join(md_code(d['id']) for d, _ in t['helpful'][:3])} |" for t in r.tokens]
        md.append("")
        page.append(f"<h2>{e(str(r.query['prompt']))}<b>{e(str(r.query['completion']))}</b></h2>")
        if r.tokens:
            spans = "".join(f"<span class='t' title='{e(', '.join(str(d['id']) for d, _ in t['helpful'][:3]))}'>"
                            f"{e(t['token'])}</span>" for t in r.tokens)
            page.append(f"<p>per token (hover for its top documents): {spans}</p>")
        for cls, rows in (("p", r.helpful), ("p n", r.harmful)):
            for d, s in rows:
                page.append(f"<div class='{cls}'><span class='s'>{e(str(d['id']))} · score {s:.4g}</span><br>"
                            f"{e(str(d['text']))}</div>")
    page.append("</body></html>")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text("\n".join(page))
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
