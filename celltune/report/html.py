"""One-page, self-contained HTML reports (images embedded, no external assets)."""

from __future__ import annotations

import base64
import contextlib
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from celltune.files import write_text_atomic

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
color:#222;padding:0 1em;overflow-wrap:anywhere}
h1{font-size:1.6em;border-bottom:2px solid #345;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:1.6em}
.table{overflow-x:auto;max-width:100%;margin:.8em 0}
table{border-collapse:collapse;font-size:.9em;overflow-wrap:normal}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th{background:#eef2f6}td:first-child,th:first-child{text-align:left}
.figs figure{margin:1em 0}.figs img{width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}
p.reading{background:#f7f9fb;border-left:3px solid #345;padding:.4em .8em}
p.verdict{background:#eef6ee;border-left:5px solid #2a7;padding:.6em .9em;font-size:1.1em}
.meta{color:#666;font-size:.85em}
"""


def format_number(value: float) -> str:
    """A number for a report: 3 significant digits, scientific only below 1e-3.

    ``0.00009882`` → ``9.88e-05``, ``0.1234`` → ``0.123``, ``12.345`` → ``12.3``, ``1234.5``
    → ``1,234``; whole numbers print whole.
    """
    v = float(value)
    if v != v:  # NaN
        return "–"
    if v == 0 or (v.is_integer() and abs(v) < 1e15):
        return f"{int(v):,}"
    if abs(v) < 1e-3:
        return f"{v:.2e}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def clean_table(df: pd.DataFrame) -> pd.DataFrame:
    """The frame a report shows: the index as a named first column (dropped when it is
    unnamed row numbers) and one header row (multi-level column names joined)."""
    out = df.copy()
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [" ".join(str(p) for p in col if str(p)) for col in out.columns]
    positional = out.index.nlevels == 1 and out.index.name is None
    if positional and pd.api.types.is_integer_dtype(out.index.dtype):  # row numbers
        return out.reset_index(drop=True)
    names = [n if n is not None else "" for n in out.index.names]
    out.index = out.index.set_names([f"__index{i}" for i in range(len(names))])
    out = out.reset_index()
    return out.rename(columns={f"__index{i}": n for i, n in enumerate(names)})


@dataclass
class Section:
    """A report section: a heading, plain-language sentences, tables and images."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)
    images: list[str | os.PathLike[str]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def _image_tag(path: str | os.PathLike[str], caption: str, base: Path | None) -> str:
    """A figure on its own row at full width (at most its own pixel width); a click opens
    the image file (or the embedded image)."""
    raw = Path(path).read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    # full width, but never blown up past the image's own pixels (PNG header: IHDR width)
    width = int.from_bytes(raw[16:20], "big") if raw[:8] == b"\x89PNG\r\n\x1a\n" else 0
    src = f"data:image/png;base64,{data}"
    href = src
    if base is not None:
        with contextlib.suppress(ValueError):  # not next to the report: the embedded copy
            href = Path(path).resolve().relative_to(base.resolve()).as_posix()
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    alt = html.escape(caption)
    style = f' style="max-width:{width}px"' if width else ""
    img = f'<a href="{html.escape(href)}" target="_blank"><img src="{src}" alt="{alt}"{style}></a>'
    return f"<figure>{img}{cap}</figure>"


def _table_html(df: pd.DataFrame) -> str:
    table = clean_table(df).to_html(
        index=False, float_format=format_number, na_rep="–", border=0, escape=True
    )
    return f"<div class='table'>{table}</div>"


def render_report(
    title: str,
    sections: list[Section],
    meta: str = "",
    verdict: str = "",
    base: Path | None = None,
) -> str:
    """Return the HTML text of a report: ``verdict`` on top, then ``sections`` in order.

    Images link to their file relative to ``base`` (the report's folder) when they lie
    under it, else to their embedded copy.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if verdict:
        parts.append(f"<p class='verdict'><b>Verdict:</b> {html.escape(verdict)}</p>")
    if meta:
        parts.append(f"<p class='meta'>{html.escape(meta)}</p>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts.extend(f"<p class='reading'>{html.escape(t)}</p>" for t in sec.text)
        parts.extend(_table_html(t) for t in sec.tables)
        if sec.images:
            caps = list(sec.captions) + [""] * (len(sec.images) - len(sec.captions))
            figs = "".join(_image_tag(p, c, base) for p, c in zip(sec.images, caps, strict=True))
            parts.append(f"<div class='figs'>{figs}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike[str],
    title: str,
    sections: list[Section],
    meta: str = "",
    verdict: str = "",
) -> Path:
    """Render and write a report atomically; returns the path."""
    base = Path(path).parent
    write_text_atomic(path, render_report(title, sections, meta, verdict=verdict, base=base))
    return Path(path)
