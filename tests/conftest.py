"""Shared test fixtures: paths to the real datasets and reference fixtures in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLTUNE_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures" / "scgpt_reference"

KANG_STIM = DATA / "integration" / "kang2018_pbmc_ifnb_ctrl_stim_muscat_1556cells.h5ad"
KANG_DONORS = DATA / "integration" / "kang2018_pbmc_ctrl_8donors_muscat_12261cells.h5ad"
KANG_HARMONY = DATA / "integration" / "kang2018_pbmc_ifnb_harmony_pbmc_stim_2000cells.h5ad"
PAPALEXI = DATA / "perturbation" / "papalexi2021_thp1_eccite_sceptre_lowmoi.h5ad"
ADAMSON_MINI = DATA / "perturbation" / "adamson2016_gears_mini_320x160.h5ad"


def pytest_configure(config: pytest.Config) -> None:
    # Keep tests from oversubscribing the 2 CI cores.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if not DATA.is_dir():
        raise pytest.UsageError(
            f"shared data not found at {DATA}: check out ../shared beside the repository "
            "or set CELLTUNE_SHARED"
        )


@pytest.fixture(scope="session")
def kang_stim_path() -> Path:
    return KANG_STIM


@pytest.fixture(scope="session")
def kang_donors_path() -> Path:
    return KANG_DONORS


@pytest.fixture(scope="session")
def kang_harmony_path() -> Path:
    return KANG_HARMONY


@pytest.fixture(scope="session")
def papalexi_path() -> Path:
    return PAPALEXI


@pytest.fixture(scope="session")
def adamson_mini_path() -> Path:
    return ADAMSON_MINI


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
