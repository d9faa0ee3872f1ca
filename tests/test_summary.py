"""``python -m vrpo_pl.summary``: a run's event files read back into before/after figures."""

import os
import time

import pytest
from torch.utils.tensorboard import SummaryWriter

from vrpo_pl.summary import find_run, main, read_scalars, summarize


def _write_run(path, accuracies, gold):
    writer = SummaryWriter(str(path))
    for step, value in accuracies:
        writer.add_scalar("val/accuracy", value, step)
    for step, value in enumerate(gold, start=1):
        writer.add_scalar("reward/gold", value, step)
    writer.close()


def test_summary_reports_before_after_and_curves(tmp_path, capsys):
    _write_run(tmp_path / "version_0", [(0, 0.25), (4, 0.5)], [0.1, 0.2, 0.3, 0.4])
    scalars = read_scalars(tmp_path / "version_0")
    assert scalars["val/accuracy"] == [(0, 0.25), (4, 0.5)]
    text = summarize(scalars)
    assert "0.250 at rollout 0 -> 0.500 at rollout 4 (+0.250)" in text
    assert "reward/gold" in text and "first 0.100  last 0.400" in text
    assert main([str(tmp_path)]) == 0
    assert "version_0" in capsys.readouterr().out


def test_find_run_takes_the_newest_version(tmp_path):
    _write_run(tmp_path / "version_0", [(0, 0.1)], [])
    _write_run(tmp_path / "version_1", [(0, 0.2)], [])
    old = time.time() - 100
    for f in (tmp_path / "version_1").glob("events.*"):
        os.utime(f, (old, old))
    assert find_run(tmp_path) == tmp_path / "version_0"
    assert find_run(tmp_path / "version_1") == tmp_path / "version_1"


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        find_run(tmp_path)
    assert main([str(tmp_path / "nothing")]) == 2
    assert "pass the logger's save_dir/name" in capsys.readouterr().err
