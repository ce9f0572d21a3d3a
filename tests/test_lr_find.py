"""``cnncodes lr-find``: the learning-rate range test, its suggestions, and the command."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.finetune.lr_find import lr_find, steepest, valley

from .test_finetune import TINY, tiny_config, write_many


def test_valley_is_two_thirds_down_the_longest_fall_and_steepest_the_fastest():
    lrs = np.logspace(-6, 0, 13)
    #          flat           falling for 6 steps                    then up
    losses = [2.0, 2.0, 2.0, 1.9, 1.7, 1.4, 1.0, 0.7, 0.6, 0.55, 0.8, 1.5, 3.0]
    i = valley(losses)
    assert 4 <= i <= 7 and losses[i] < losses[2]  # inside the fall, before its bottom
    assert steepest(lrs, losses) in (5, 6)        # where the loss drops by 0.4 per step
    assert valley([1.0]) == 0 and steepest([1e-3, 1e-2], [1.0, 0.5]) == 0


def test_the_range_test_sweeps_rates_exponentially_and_keeps_the_groups_ratios(tmp_path):
    data = write_many(tmp_path / "data")
    r = lr_find(tiny_config(data, ""), "all", min_lr=1e-5, max_lr=1e-1, steps=12, progress=False)
    assert len(r.lrs) <= 12 and r.lrs[0] == pytest.approx(1e-5)
    ratios = np.diff(np.log(r.lrs))
    assert np.allclose(ratios, ratios[0])  # exponential
    assert all(np.isfinite(r.raw_losses)) or r.stopped == "diverged"
    assert r.lrs[0] <= r.suggestion <= r.lrs[-1] and r.minimum_tenth == pytest.approx(
        r.lrs[int(np.nanargmin(r.losses))] / 10)


def test_the_command_writes_its_files_and_never_overwrites_them(tmp_path):
    data = write_many(tmp_path / "data")
    args = ["lr-find", str(data), "--model", TINY, "--weights", "none", "-b", "4", "-j", "0", "--steps", "8",
            "--out", str(tmp_path / "lr"), "-q"]
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["stage"] == "all" and (tmp_path / "lr" / "lr-find.png").stat().st_size > 0
    assert json.loads((tmp_path / "lr" / "lr-find.json").read_text())["suggestion"] == out["suggestion"]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--overwrite" in again.output and "Traceback" not in again.output
    assert CliRunner().invoke(cli, [*args, "--overwrite", "--start", "head"]).exit_code == 0
    bad = CliRunner().invoke(cli, [*args, "--overwrite", "--min-lr", "1", "--max-lr", "0.1"])
    assert bad.exit_code == 1 and "--min-lr must be below --max-lr" in bad.output
