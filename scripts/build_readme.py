"""Assemble README.md from docs/readme_parts/*.md in reading order.

The fragments are the maintained source (one per area, each owned by its area); run
``python scripts/build_readme.py`` after editing one.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    "00_intro",
    "preprocess",
    "model",
    "train",
    "integration",
    "eval",
    "perturbation_data",
    "perturbation",
    "stats",
    "scale",
    "99_status",
]


def main() -> None:
    parts = ROOT / "docs" / "readme_parts"
    known = {p.stem for p in parts.glob("*.md")}
    missing = [name for name in ORDER if name not in known]
    extra = sorted(known - set(ORDER))
    if missing or extra:
        raise SystemExit(f"readme parts missing: {missing}; not in ORDER: {extra}")
    text = "\n\n".join((parts / f"{name}.md").read_text().strip() for name in ORDER) + "\n"
    (ROOT / "README.md").write_text(text)
    print(f"README.md: {len(text.splitlines())} lines from {len(ORDER)} parts")


if __name__ == "__main__":
    main()
