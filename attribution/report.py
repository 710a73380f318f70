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


def md_code(text) -> str:
    """Inline Markdown code span that shows ``text`` literally (backticks, pipes, HTML and all)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "`"
    while fence in text:
        fence += "`"
    return f"{fence} {text} {fence}"


def write_reports(out: str | Path, results: list[Attribution], meta: dict) -> dict[str, Path]:
    """report.json, report.md and report.html with each prompt, completion and its top passages."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "queries": [
        {"query": r.query,
         "helpful": [{"id": d["id"], "score": s, "text": d["text"]} for d, s in r.helpful],
         "harmful": [{"id": d["id"], "score": s, "text": d["text"]} for d, s in r.harmful]} for r in results]}
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    e = html.escape
    md = [f"# Training-data attribution ({md_code(meta.get('method', 'if'))}, {md_code(meta.get('compressor', ''))}, "
          f"k={md_code(meta.get('k'))})", ""]
    page = ["<html><head><meta charset='utf-8'><title>grass_ops attribution</title><style>body{font-family:sans-serif;"
            "max-width:60em;margin:auto} .p{border-left:4px solid #2a7;padding:.3em .8em;margin:.4em 0}"
            " .n{border-color:#c33} .s{color:#666;font-size:.85em}</style></head><body>",
            f"<h1>Training-data attribution</h1><p class='s'>{e(json.dumps(meta))}</p>"]
    for r in results:
        md += [f"## Prompt: {md_code(r.query['prompt'])}", "", f"**Completion:** {md_code(r.query['completion'])}", "",
               "| | score | id | passage |", "|---|---|---|---|"]
        md += [f"| + | {s:.4g} | {md_code(d['id'])} | {md_code(d['text'][:300])} |" for d, s in r.helpful]
        md += [f"| - | {s:.4g} | {md_code(d['id'])} | {md_code(d['text'][:300])} |" for d, s in r.harmful]
        md.append("")
        page.append(f"<h2>{e(str(r.query['prompt']))}<b>{e(str(r.query['completion']))}</b></h2>")
        for cls, rows in (("p", r.helpful), ("p n", r.harmful)):
            for d, s in rows:
                page.append(f"<div class='{cls}'><span class='s'>{e(str(d['id']))} · score {s:.4g}</span><br>"
                            f"{e(str(d['text']))}</div>")
    page.append("</body></html>")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text("\n".join(page))
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
