"""The sentences sweep and compare print say only what their figures show: constructed tables,
no network."""
from __future__ import annotations

import pandas as pd

from cnncodes.pipelines.compare.strategies import conclude as conclude_compare
from cnncodes.pipelines.finetune.result import convergence
from cnncodes.pipelines.sweep.report import conclude as conclude_sweep

# Words that place data in a quadrant of the seeds' rule (similar/different, small/large).
QUADRANT_CLAIMS = ("like ImageNet's", "unlike ImageNet", "'similar'", "'different'", "differs from ImageNet",
                   "'small data'", "'large data'", "pattern expected")


def _sweep_table(accuracies: dict[str, float]) -> pd.DataFrame:
    rows = []
    for i, (layer, acc) in enumerate(accuracies.items()):
        depth = (i + 1) / len(accuracies)
        rows.append({"model": "efficientnet_lite0", "classifier": "svm", "layer": layer,
                     "module": f"blocks.{i}", "relative_depth": depth, "gflops": 0.4 * depth, "fitted": True,
                     "cv_accuracy": acc, "cv_std": 0.01, "test_accuracy": acc})
    return pd.DataFrame(rows)


def test_a_sweep_rising_at_the_top_claims_no_similarity_to_imagenet():
    # PACS-style sketches: nothing like ImageNet's photos, yet the top layer is the best fixed one
    lines, best = conclude_sweep(_sweep_table({"stage3": 0.55, "stage4": 0.71, "stage5": 0.78}))
    reading = lines[-1]
    assert best["layer"] == "stage5" and "still rises at the top" in reading
    assert "best fixed features" in reading and "does not make the data similar" in reading
    assert not any(c in " ".join(lines) for c in QUADRANT_CLAIMS)


def test_a_sweep_falling_at_the_top_says_which_layer_reads_the_data_not_what_the_data_is():
    lines, best = conclude_sweep(_sweep_table({"stage3": 0.89, "stage4": 0.97, "stage5": 0.92}))
    assert best["layer"] == "stage4" and "falls at the top" in lines[-1]
    assert "an earlier layer's codes read this data better" in lines[-1]
    assert not any(c in " ".join(lines) for c in QUADRANT_CLAIMS)


def _stage(name: str, val: list[float], train: list[float]) -> dict:
    return {"name": name, "epochs": len(val), "epochs_run": len(val), "val_accuracy_by_epoch": val,
            "train_accuracy_by_epoch": train, "best_val_accuracy": max(val)}


def test_convergence_reads_the_last_stage_of_a_run():
    head = _stage("head", [0.70, 0.75], [0.6, 0.7])
    assert "still rising at its last epoch (0.770 -> 0.870 in all)" in convergence(
        [head, _stage("all", [0.77, 0.87], [0.80, 0.92])])
    assert convergence([head, _stage("all", [0.86, 0.87, 0.866], [0.95, 0.97, 0.98])]) is None  # a plateau
    assert convergence([head, _stage("all", [0.80, 0.90, 0.88], [0.95, 0.99, 1.0])]) is None  # past its best
    assert "training accuracy was still rising far from saturation" in convergence(
        [head, _stage("all", [0.60, 0.605], [0.40, 0.50])])
    assert "ran 1 epoch" in convergence([head, _stage("all", [0.8], [0.9])])
    stopped = {**_stage("all", [0.60, 0.605], [0.40, 0.50]), "epochs": 10}  # ended by --patience
    assert convergence([head, stopped]) is None
    assert convergence([]) is None


def _compare_table(probe: float, top: float, all_: float, scratch: float, *, rising: bool,
                   scratch_rising: bool = True) -> pd.DataFrame:
    def run(acc, still):
        curve = [acc - 0.10, acc] if still else [acc, acc - 0.002]
        return [_stage("head", [0.5, 0.6], [0.5, 0.6]), _stage("all", curve, [0.97, 0.99])]
    rows = [{"strategy": "probe", "test_accuracy": probe, "stages": None},
            {"strategy": "top", "test_accuracy": top, "stages": run(top, rising)},
            {"strategy": "all", "test_accuracy": all_, "stages": run(all_, rising)},
            {"strategy": "scratch", "test_accuracy": scratch, "stages": run(scratch, scratch_rising)}]
    return pd.DataFrame(rows)


SIZES, CLASSES = {"train": 3400, "val": 380, "test": 500}, 10


def test_an_under_trained_fine_tune_is_inconclusive_not_a_verdict():
    # the clothing set: head 1 + 2 epochs, validation 0.77 -> 0.87 at the last epoch
    df = _compare_table(0.90, 0.86, 0.87, 0.30, rising=True)
    lines = conclude_compare(df, SIZES, CLASSES, "stage5", "penultimate", epochs=2)
    text = " ".join(lines)
    assert lines[1].startswith("Inconclusive: fine-tuning (0.8700 at best) has not beaten the linear probe")
    assert "had not converged" in lines[1] and "rerun with --epochs 4 (finished strategies are kept and " \
        "extended" in lines[1]
    assert "keep the network fixed" not in text
    assert "is not read: top and all had not converged" in text
    assert "pretraining learns faster, not that the data needs it" in text
    assert not any(c in text for c in QUADRANT_CLAIMS)


def test_converged_runs_are_read_as_the_figures_show():
    lines = conclude_compare(_compare_table(0.90, 0.86, 0.87, 0.30, rising=False, scratch_rising=False),
                             SIZES, CLASSES, "stage5", "penultimate", epochs=3)
    text = " ".join(lines)
    assert "converged) does not beat the linear probe" in text and "keep the network fixed" in text
    assert "ImageNet's early layers serve this data as they are" in text
    assert "pretraining is what makes this data set learnable" in text
    lines = conclude_compare(_compare_table(0.70, 0.74, 0.82, 0.50, rising=False), SIZES, CLASSES, "stage5",
                             "penultimate", epochs=3)
    text = " ".join(lines)
    assert lines[0].startswith("Best: all") and "Fine-tuning beats the linear probe by 12.0 points" in text
    assert "the early layers had to change for this data" in text
    assert not any(c in text for c in QUADRANT_CLAIMS)


def test_a_fine_tune_that_wins_while_still_rising_is_a_lower_bound():
    lines = conclude_compare(_compare_table(0.70, 0.80, 0.78, 0.40, rising=True), SIZES, CLASSES, "stage5",
                             "penultimate", epochs=3)
    assert "moving the weights pays on this data (and it had not converged: more epochs may add more)" \
        in lines[1]
