"""Render report.html files in headless Chromium at 1280 px; fail when a page overflows.

    python scripts/screenshot_reports.py RUN_DIR_OR_REPORT ... [--out shots/] [--width 1280]

Each report is copied next to itself with a probe script appended that writes the page's
``scrollWidth`` and ``clientWidth`` into the DOM; ``chromium --headless --dump-dom`` then
reads them (a page fits when ``scrollWidth <= clientWidth``). ``--out`` also saves a
screenshot (``chromium --screenshot``) of each report. Exit status 1 when any report
overflows, 2 when Chromium is missing (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PROBE = (
    "<script>window.addEventListener('load',()=>{const d=document.documentElement;"
    "document.body.setAttribute('data-width', d.scrollWidth+' '+d.clientWidth)})</script>"
)


@dataclass
class Fit:
    report: Path
    scroll_width: int
    client_width: int
    screenshot: Path | None = None

    @property
    def fits(self) -> bool:
        return self.scroll_width <= self.client_width


def chromium() -> str | None:
    """The Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(browser: str, args: list[str], timeout: float = 120) -> str:
    base = [browser, "--headless", "--disable-gpu", "--hide-scrollbars"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        base.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    res = subprocess.run(
        [*base, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return res.stdout


def measure(report: Path, width: int = 1280, shot_dir: Path | None = None) -> Fit:
    """Page width of ``report`` at ``width`` px (and a screenshot into ``shot_dir``)."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found (Debian: apt-get install -y chromium)")
    probe = report.with_name(report.stem + ".probe.html")
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    try:
        size = f"--window-size={width},2000"
        dom = _run(browser, [size, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()])
    finally:
        probe.unlink(missing_ok=True)
    match = re.search(r'data-width="(\d+) (\d+)"', dom)
    if match is None:
        raise RuntimeError(f"no width probe in Chromium's DOM of {report}")
    shot = None
    if shot_dir is not None:
        shot_dir.mkdir(parents=True, exist_ok=True)
        shot = shot_dir / f"{report.parent.name}_{report.stem}.png"
        _run(browser, [f"--window-size={width},2000", f"--screenshot={shot}", report.as_uri()])
    return Fit(report, int(match.group(1)), int(match.group(2)), shot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="report.html files or run dirs")
    parser.add_argument("--out", type=Path, default=None, help="folder for screenshots")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    if chromium() is None:
        print("chromium not found (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    reports = [p / "report.html" if p.is_dir() else p for p in args.paths]
    bad = 0
    for report in reports:
        fit = measure(report, args.width, args.out)
        state = "fits" if fit.fits else "OVERFLOWS"
        print(f"{state}: {report} (page {fit.scroll_width} px in {fit.client_width} px)")
        bad += not fit.fits
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
