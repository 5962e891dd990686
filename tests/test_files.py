"""Atomic writes: complete or absent, never half-written, normal permissions."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest

from celltune.files import atomic_path, write_json_atomic, write_text_atomic


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_permissions_follow_umask(tmp_path):
    target = tmp_path / "out.txt"
    old = os.umask(0o022)
    try:
        write_text_atomic(target, "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_json_nan_becomes_null(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic(target, {"a": math.nan, "b": [1.5, math.inf]})
    assert json.loads(target.read_text()) == {"a": None, "b": [1.5, None]}
