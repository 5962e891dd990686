"""One-page, self-contained HTML reports (images embedded, no external assets)."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from celltune.files import write_text_atomic

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
color:#222;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #345;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#eef2f6}
td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0;flex:1 1 45%}
.figs img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
p.reading{background:#f7f9fb;border-left:3px solid #345;padding:.4em .8em}
.meta{color:#666;font-size:.85em}
"""


@dataclass
class Section:
    """A report section: a heading, plain-language sentences, tables and images."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)
    images: list[str | os.PathLike[str]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def _image_tag(path: str | os.PathLike[str], caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    img = f'<img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
    return f"<figure>{img}{cap}</figure>"


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(float_format=lambda v: f"{v:.4g}", na_rep="–", border=0, escape=True)


def render_report(title: str, sections: list[Section], meta: str = "") -> str:
    """Return the HTML text of a report with ``sections`` in order."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if meta:
        parts.append(f"<p class='meta'>{html.escape(meta)}</p>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts.extend(f"<p class='reading'>{html.escape(t)}</p>" for t in sec.text)
        parts.extend(_table_html(t) for t in sec.tables)
        if sec.images:
            caps = list(sec.captions) + [""] * (len(sec.images) - len(sec.captions))
            figs = "".join(_image_tag(p, c) for p, c in zip(sec.images, caps, strict=True))
            parts.append(f"<div class='figs'>{figs}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike[str], title: str, sections: list[Section], meta: str = ""
) -> Path:
    """Render and write a report atomically; returns the path."""
    write_text_atomic(path, render_report(title, sections, meta))
    return Path(path)
