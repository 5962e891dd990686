"""The default install is what the default commands need; scVI is an extra that degrades.

``scripts/setup.sh`` installs the ``dev`` and ``docs`` extras; ``--all`` adds ``scvi``.
Without scvi-tools the scVI baseline is skipped with a reason, never raised.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_scvi_is_an_extra_and_docs_are_pinned() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("scvi") for d in meta["dependencies"])
    extras = meta["optional-dependencies"]
    assert any(d.startswith("scvi-tools==") for d in extras["scvi"])
    assert all("==" in d for d in extras["docs"]), extras["docs"]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'EXTRAS="dev,docs"' in setup and 'EXTRAS="dev,docs,scvi"' in setup
    # numpy is installed before anything imports torch (torch warns without numpy)
    assert setup.index("numpy") < setup.index("import torch")


def test_scvi_baseline_skipped_with_reason_when_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celltune.eval import baselines

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scvi" else real(name, *a)
    )
    a = ad.AnnData(np.ones((10, 5), dtype=np.float32))
    a.obs["batch"] = ["a", "b"] * 5
    emb, reason = baselines.scvi_embedding(a, "batch", counts_layer=None)
    assert emb is None
    assert "not installed" in reason
