"""Logs: short epoch lines, a library's repeated message once, logging from Python, the
public API in dir(celltune)."""

from __future__ import annotations

import logging

import celltune
from celltune.report.log_filters import once_per_run
from celltune.train.progress import epoch_line


def test_epoch_line_is_short_and_keeps_the_main_terms():
    record = {"epoch": 3, "lr": 1e-4, "time_s": 21.345}
    record |= {f"train/term{i}": 1234.5678 + i for i in range(20)}
    record |= {"train/loss": 1472.123, "val/loss": 1427.5, "val/mse": 759.6412}
    line = epoch_line(record, "val/mse", 30)
    assert len(line) < 160
    assert line.startswith("epoch 3/30: train/loss=1472, val/mse=759.6, val/loss=1428")
    assert "lr=0.0001" in line and "term" not in line


def test_repeated_library_message_once(caplog):
    with caplog.at_level(logging.INFO), once_per_run("isolated labels"):
        for _ in range(3):
            logging.getLogger().info("isolated labels: no more than 2 batches per label")
            logging.getLogger().info("other")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("isolated labels: no more than 2 batches per label") == 1
    assert msgs.count("other") == 3


def test_set_verbosity_adds_one_handler(capsys):
    log = logging.getLogger("celltune")
    before = (list(log.handlers), log.level, log.propagate)
    try:
        celltune.set_verbosity("info")
        celltune.set_verbosity("info")
        logging.getLogger("celltune.test").info("hello from celltune")
        assert "hello from celltune" in capsys.readouterr().err
        assert sum(getattr(h, "_celltune", False) for h in log.handlers) == 1
        celltune.set_verbosity("warning")
        logging.getLogger("celltune.test").info("hidden")
        assert "hidden" not in capsys.readouterr().err
    finally:
        log.handlers[:], log.level, log.propagate = before


def test_dir_lists_the_public_api():
    names = dir(celltune)
    assert {"run_integrate", "preprocess", "set_verbosity", "load_model"} <= set(names)
    assert set(celltune.__all__) <= set(names)
    assert "importlib" not in names and "Any" not in names
    assert "set_verbosity" in (celltune.__doc__ or "")
