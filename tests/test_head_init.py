"""Probe, then fine-tune: the new head starts as the softmax probe of the training codes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cnncodes.pipelines.finetune.checkpoints import load_checkpoint
from cnncodes.pipelines.finetune.head_init import (
    TEMPERATURE_BOUNDS,
    fit_temperature,
    floored_standardisation,
    head_arrays,
)
from cnncodes.pipelines.finetune.training import finetune
from cnncodes.pipelines.probes.codes import Codes

from .test_finetune import tiny_config, write_many


def _codes(n_classes: int, seed: int = 0) -> Codes:
    rng = np.random.default_rng(seed)
    y = np.arange(60) % n_classes
    X = (rng.normal(size=(60, 12)) * rng.uniform(0.1, 5, 12) + rng.normal(size=12) + 2.0 * y[:, None]
         ).astype(np.float32)
    from pathlib import Path
    return Codes(Path(""), "l", X, y, np.full(60, "train", dtype=object), np.arange(60),
                 [f"{i}.png" for i in range(60)], [f"c{k}" for k in range(n_classes)], {}, {})


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_head_computes_the_probes_scores_on_raw_codes(n_classes):
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    from cnncodes.pipelines.probes.linear_model import probabilities
    codes = _codes(n_classes)
    fit = fit_linear_probe(codes, "l", "softmax", folds=3, solver="batched")
    probe = fit.pipeline
    w, b = head_arrays(probe, n_classes)
    logits = codes.X.astype(np.float64) @ w.T.astype(np.float64) + b
    want = probe.to_pipeline().predict_proba(codes.X)
    assert np.allclose(probabilities(logits), want, atol=1e-5)


def test_features_that_barely_vary_get_the_median_features_spread():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 8)) * np.array([1.0, 2.0, 3.0, 4.0, 5.0, 1e-6, 0.0, 1e-3])
    mean, scale = floored_standardisation(X)
    assert np.allclose(mean, X.mean(0))
    spread = X.std(0)
    assert np.allclose(scale, np.maximum(spread, np.median(spread)))
    assert np.allclose(scale[1:5], spread[1:5]) and np.allclose(scale[5:], np.median(spread))
    assert np.all(floored_standardisation(np.ones((5, 3)))[1] == 1.0)  # nothing varies: raw codes


@pytest.mark.parametrize("true_t", [0.6, 1.0, 4.0, 30.0])
def test_temperature_scaling_recovers_the_temperature_labels_were_drawn_with(true_t):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(4000, 5)) * true_t  # a head too sharp (or too soft) by true_t
    p = np.exp(logits / true_t - (logits / true_t).max(1, keepdims=True))
    y = np.array([rng.choice(5, p=row / row.sum()) for row in p])
    assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.1)


def test_a_temperature_never_leaves_its_bounds_nor_changes_the_predictions():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 3))
    y = logits.argmin(1)  # labels that disagree with the probe everywhere: the flattest allowed head
    assert fit_temperature(logits, y) == pytest.approx(TEMPERATURE_BOUNDS[1], rel=1e-2)
    # a probe right everywhere is sharpened at most 2x: a smaller temperature would blow the head up
    assert fit_temperature(logits * 1e-3, logits.argmax(1)) == pytest.approx(0.5, rel=1e-2)
    assert TEMPERATURE_BOUNDS[0] == 0.5


@pytest.mark.parametrize("n_seen", [2, 3])
def test_classes_the_probe_never_saw_never_win_at_the_start(n_seen):
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    codes = _codes(n_seen)
    probe = fit_linear_probe(codes, "l", "softmax", folds=3, solver="batched").pipeline
    w, b = head_arrays(probe, 5)  # a head of 5 classes, of which the training images hold n_seen
    assert not w[n_seen:].any() and (b[n_seen:] < b[:n_seen].min() - 29).all()
    logits = codes.X @ w.T + b
    assert np.array_equal(logits.argmax(1), probe.to_pipeline().predict(codes.X))  # the probe, exactly


def test_a_new_run_starts_from_the_probe_and_a_resume_keeps_its_record(tmp_path):
    data = write_many(tmp_path / "data")
    # a learning rate too small to move anything: the head after one epoch is the head it started as
    r = finetune(tiny_config(data, tmp_path / "run", stages="head:1", lr=1e-12, head_lr_mult=1.0),
                 progress=False)
    assert r.head_init["kind"] == "probe" and r.head_init["rows"] == r.images["train"]
    assert r.head_init["C"] > 0 and 0 <= r.head_init["cv_accuracy"] <= 1

    from cnncodes.pipelines.finetune.data import make_splits
    from cnncodes.pipelines.finetune.head_init import fit_probe_head
    splits = make_splits(data, 0.3, 0)
    init = fit_probe_head("timm:test_efficientnet", "none", splits.table, splits.train, 3,
                          decode="reduced", seed=0, device="cpu", batch_size=4, val_rows=splits.val)
    assert init.val_rows == r.head_init["val_rows"] and init.val_rows in (0, len(splits.val))
    assert r.head_init["temperature"] == round(init.temperature, 4)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert np.allclose(state["classifier.weight"].numpy(), init.weight, atol=1e-6)
    assert np.allclose(state["classifier.bias"].numpy(), init.bias, atol=1e-6)
    again = finetune(tiny_config(data, tmp_path / "run", stages="head:1", lr=1e-12, head_lr_mult=1.0),
                     resume=True, progress=False)
    assert again.status == "up to date" and again.head_init == r.head_init


def test_random_heads_say_why(tmp_path):
    data = write_many(tmp_path / "data")
    r = finetune(tiny_config(data, tmp_path / "a", stages="head:1", init_head="random"), progress=False)
    assert r.head_init == {"kind": "random", "C": None, "cv_accuracy": None, "rows": 0, "seconds": 0.0,
                           "why": "asked for", "temperature": 1.0, "val_rows": 0}
    r = finetune(tiny_config(data, tmp_path / "b", stages="all:1", from_scratch=True), progress=False)
    assert r.head_init["kind"] == "random" and r.head_init["why"] == "from scratch"


def test_runs_made_before_decode_and_init_head_resume_as_exact_and_random(tmp_path):
    data = write_many(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", stages="head:1,all:1", decode="exact", init_head="random")
    finetune(cfg, progress=False)
    last = tmp_path / "run" / "last.pt"
    ckpt = load_checkpoint(last)
    for key in ("decode", "init_head"):  # as a run of an older cnncodes wrote it
        del ckpt["recipe"][key]
    del ckpt["head_init"]
    torch.save(ckpt, last)
    r = finetune(cfg, resume=True, progress=False)
    assert r.status == "up to date"
    # a run made with the former defaults is refused, and told the flags that resume it
    ckpt["recipe"].update(lr=5e-3, optimizer="sgd", bn="frozen", augment="standard")
    torch.save(ckpt, last)
    with pytest.raises(Exception, match="former defaults: resume it with --lr 0.005 --optimizer sgd "
                                        "--bn frozen --augment standard"):
        finetune(cfg, resume=True, progress=False)
    with pytest.raises(Exception, match="decode: 'exact' in the run, 'reduced' now"):
        finetune(tiny_config(data, tmp_path / "run", stages="head:1,all:1", init_head="random"), resume=True,
                 progress=False)


def test_a_finished_run_is_extended_by_more_epochs_of_its_last_stage(tmp_path):
    import json
    data = write_many(tmp_path / "data")
    out = tmp_path / "run"
    first = finetune(tiny_config(data, out, stages="head:1,all:1"), progress=False)
    before = (out / "metrics.jsonl").read_text().splitlines()
    longer = finetune(tiny_config(data, out, stages="head:1,all:3"), resume=True, progress=False)
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert first.status == "trained" and longer.status == "extended" and longer.epochs_run == 4
    assert after[:2] == before and [json.loads(l)["stage"] for l in after] == ["head", "all", "all", "all"]
    assert longer.head_init == first.head_init  # the head was not fitted again
    assert finetune(tiny_config(data, out, stages="head:1,all:3"), resume=True, progress=False).status == \
        "up to date"
    # anything else that changes is another recipe: refused, or started again with --overwrite
    with pytest.raises(Exception, match="different recipe"):
        finetune(tiny_config(data, out, stages="head:2,all:3"), resume=True, progress=False)
    with pytest.raises(Exception, match="different recipe"):
        finetune(tiny_config(data, out, stages="head:1,all:2"), resume=True, progress=False)  # fewer
