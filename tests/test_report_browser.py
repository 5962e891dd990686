"""Reports fit 1280 px in a real headless browser (Chromium; skipped where it is absent).

scripts/screenshot_reports.py does the measuring: the page's scrollWidth must not exceed
the window's width. A report with a 40-column table and a wide figure fits (the table
scrolls inside its own box, the figure scales); a page with a fixed 1500 px element does
not, which shows the check can fail.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celltune.report.html import Section, write_report

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_reports.py"
spec = importlib.util.spec_from_file_location("screenshot_reports", SCRIPT)
shots = importlib.util.module_from_spec(spec)
sys.modules["screenshot_reports"] = shots  # dataclasses look their module up there
spec.loader.exec_module(shots)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shots.chromium() is None, reason="chromium not installed (apt-get install -y chromium)"
    ),
]


def test_wide_report_fits_1280px(tmp_path):
    from PIL import Image

    png = tmp_path / "umap_wide.png"
    Image.new("RGB", (2400, 600), "white").save(png)
    wide = pd.DataFrame(
        np.random.default_rng(0).random((5, 40)), columns=[f"metric_{i}" for i in range(40)]
    )
    report = write_report(
        tmp_path / "report.html",
        "wide",
        [Section("Table", tables=[wide]), Section("Figure", images=[png], captions=["wide"])],
        verdict="a verdict",
        meta=str(tmp_path / ("a_very_long_path_without_spaces_" * 10)),
    )
    fit = shots.measure(report, 1280, tmp_path / "shots")
    assert fit.fits, (fit.scroll_width, fit.client_width)
    assert fit.screenshot is not None and fit.screenshot.stat().st_size > 0


def test_overflowing_page_is_caught(tmp_path):
    page = tmp_path / "report.html"
    page.write_text("<html><body><div style='width:1500px'>wide</div></body></html>")
    fit = shots.measure(page, 1280)
    assert not fit.fits and fit.scroll_width >= 1500
