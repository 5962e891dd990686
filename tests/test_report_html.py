"""Report HTML: 3-significant-digit numbers, scrolling tables with one header row, one
full-width figure per row that links to its file, the verdict on top, no duplicate rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celltune.report.html import Section, clean_table, format_number, render_report, write_report
from celltune.report.perturbation_run import drop_duplicate_subgroups


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (9.882e-05, "9.88e-05"),
        (0.1234567, "0.123"),
        (12.345, "12.3"),
        (0.5, "0.5"),
        (1234.5, "1,234"),
        (3.0, "3"),
        (0.0, "0"),
        (-0.00123, "-0.00123"),
        (float("nan"), "–"),
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text


def test_tables_have_one_header_row_and_no_pandas_index():
    df = pd.DataFrame({"method": ["a", "b"], "score": [0.123456, 9.882e-05]}).set_index("method")
    html = render_report("t", [Section("s", tables=[df])])
    head = html.split("<thead>")[1].split("</thead>")[0]
    assert head.count("<tr") == 1 and "<th></th>" not in head
    assert "<th>method</th>" in head
    assert "<div class='table'><table" in html and "overflow-x:auto" in html
    assert "0.123" in html and "9.88e-05" in html and "0.123456" not in html
    plain = render_report("t", [Section("s", tables=[pd.DataFrame({"x": [1, 2]})])])
    assert "<th></th>" not in plain  # a 0..n-1 index is not shown


def test_clean_table_flattens_column_levels():
    df = pd.DataFrame(np.ones((2, 2)), columns=pd.MultiIndex.from_tuples([("a", "x"), ("a", "y")]))
    assert list(clean_table(df).columns) == ["a x", "a y"]


def test_verdict_first_and_figures_link_to_their_file(tmp_path):
    from PIL import Image

    png = tmp_path / "umap_batch.png"
    Image.new("RGB", (4, 4)).save(png)
    path = write_report(
        tmp_path / "report.html",
        "t",
        [Section("Run", text=["ran"]), Section("UMAPs", images=[png], captions=["umap batch"])],
        verdict="celltune integrates better than PCA.",
    )
    html = path.read_text()
    assert html.index("class='verdict'") < html.index("<h2>")
    assert '<a href="umap_batch.png" target="_blank"><img src="data:image/png;base64,' in html
    assert ".figs img{width:100%" in html  # one figure per row, full width


def test_identical_subgroup_rows_are_shown_once():
    table = pd.DataFrame(
        {
            "scope": ["measured"] * 4,
            "method": ["celltune", "celltune", "additive", "additive"],
            "subgroup": ["all", "unseen_single"] * 2,
            "n": [3, 3, 3, 3],
            "pearson_delta": [0.5, 0.5, 0.2, 0.2],
        }
    )
    shown, notes = drop_duplicate_subgroups(table)
    assert list(shown["subgroup"]) == ["all", "all"] and "unseen_single" in notes[0]
    table.loc[3, "pearson_delta"] = 0.3
    shown, notes = drop_duplicate_subgroups(table)
    assert len(shown) == 4 and not notes
