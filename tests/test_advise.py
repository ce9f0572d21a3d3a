"""``cnncodes advise``: the signals, the rule on constructed figures, and the command on real data."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cnncodes.pipelines.advise.rule import recommend
from cnncodes.pipelines.advise.signals import leep, leep_gain, normalised_entropy
from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.probes.metrics import stratified_sample

from .conftest import CALTECH, needs_shared


def test_normalised_entropy_runs_from_certain_to_uniform():
    assert normalised_entropy(np.zeros((5, 1000))) == pytest.approx(1.0)
    sure = np.full((5, 1000), -50.0)
    sure[:, 3] = 50.0
    assert normalised_entropy(sure) == pytest.approx(0.0, abs=1e-6)


def test_leep_gain_is_one_when_the_head_names_the_labels_and_zero_when_it_says_nothing():
    y = np.arange(40) % 4
    named = np.full((40, 1000), -30.0)
    named[np.arange(40), 10 * y] = 30.0  # every class of the data is one ImageNet class, surely
    gain = lambda logits, labels: leep_gain(leep(logits, labels), labels)
    assert leep(named, y) == pytest.approx(0.0, abs=0.01) and gain(named, y) == pytest.approx(1.0, abs=0.01)
    blind = np.zeros((40, 1000))
    assert leep(blind, y) == pytest.approx(-np.log(4)) and gain(blind, y) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    noisy = named + rng.normal(0, 30, named.shape)
    assert 0 < gain(noisy, y) < 1
    # cross-fitted: a confident head that knows nothing of 100 labels scores no gain (in-sample
    # LEEP, estimated and scored on the same 800 images, gave it 0.5)
    y = np.arange(800) % 100
    assert gain(rng.normal(0, 4, (800, 1000)), y) == 0.0


def test_the_sample_takes_an_equal_share_of_every_class_and_two_at_least():
    y = np.array([0] * 500 + [1] * 40 + [2] * 3)
    pick = stratified_sample(y, 60, seed=0)
    assert np.bincount(y[pick]).tolist() == [20, 20, 3]
    assert np.array_equal(pick, stratified_sample(y, 60, seed=0)) and len(set(pick)) == len(pick)
    assert np.bincount(y[stratified_sample(y, 4, seed=1)]).tolist() == [2, 2, 2]


def _layers(accuracies: dict[str, float]) -> list[dict]:
    return [{"layer": name, "relative_depth": (i + 1) / len(accuracies), "probe_accuracy": acc}
            for i, (name, acc) in enumerate(accuracies.items())]


def _advice(per_class, accuracies, entropy=None, gain=None):
    return recommend(data="DATA", model="efficientnet_lite0", cache="cache/x.h5", per_class_median=per_class,
                     n_train=int(per_class * 10), n_classes=10, entropy=entropy, leep_gain=gain,
                     layers=_layers(accuracies), top=list(accuracies)[-1])


RISING = {"stage1": 0.30, "stage2": 0.45, "stage3": 0.60, "stage4": 0.80, "stage5": 0.90}
FALLING = {"stage1": 0.30, "stage2": 0.45, "stage3": 0.70, "stage4": 0.93, "stage5": 0.88}


def test_small_data_gets_a_probe_on_the_best_cheap_layer():
    r = _advice(15, RISING, entropy=0.3, gain=0.7)
    assert (r.strategy, r.layer, r.size, r.similarity) == ("linear probe", "stage5", "small", "similar")
    assert r.command == ("cnncodes extract DATA -m efficientnet_lite0 -l stage5 -o cache/x.h5 && "
                         "cnncodes fit-svm --cache cache/x.h5 -l stage5")
    r = _advice(15, FALLING, entropy=0.3, gain=0.7)
    assert (r.layer, r.similarity) == ("stage4", "different")
    assert any("an earlier layer's codes beat the top's by 5.0 points" in x for x in r.reasons)


def test_the_top_layer_winning_is_no_evidence_of_similarity():
    # rising to the top on data ImageNet's head does not recognise (PACS-style sketches)
    r = _advice(400, RISING, entropy=0.7, gain=0.1)
    assert r.similarity == "different" and r.strategy == "fine-tune everything"
    r = _advice(400, RISING)  # no ImageNet head to ask: the curve alone says nothing of similarity
    assert r.similarity == "unknown" and "alone says nothing of similarity" in " ".join(r.reasons)


def test_larger_data_fine_tunes_more_the_more_different_it_is():
    similar = _advice(400, RISING, entropy=0.3, gain=0.7)
    assert (similar.strategy, similar.unfreeze_from) == ("probe, then fine-tune", "stage5")
    assert similar.command == ("cnncodes finetune DATA -m efficientnet_lite0 --stages head:1,stage5:10 "
                               "--init-head probe")
    different = _advice(400, FALLING, entropy=0.3, gain=0.7)  # an earlier layer wins: different
    assert (different.strategy, different.unfreeze_from) == ("fine-tune everything", "all")
    assert different.layer == "stage4"  # the best fixed layer is still named
    large = _advice(3000, RISING, entropy=0.3, gain=0.7)
    assert (large.strategy, large.unfreeze_from) == ("fine-tune everything", "all")
    everything = _advice(3000, FALLING, entropy=0.7, gain=0.1)
    assert (everything.strategy, everything.unfreeze_from) == ("fine-tune everything", "all")
    assert everything.command.endswith("--stages head:1,all:10 --init-head probe")


def test_a_gap_within_the_folds_noise_is_no_evidence():
    noisy = [{**r, "probe_std": 0.05, "folds": 5} for r in _layers(FALLING)]  # 2 x 0.05 / sqrt(5) = 4.5
    r = recommend(data="DATA", model="m", cache="c.h5", per_class_median=15, n_train=150, n_classes=10,
                  entropy=0.3, leep_gain=0.7, layers=noisy, top="stage5")
    assert r.similarity == "different"  # 5.0 points > 4.5
    noisier = [{**r, "probe_std": 0.07, "folds": 5} for r in _layers(FALLING)]
    r = recommend(data="DATA", model="m", cache="c.h5", per_class_median=15, n_train=150, n_classes=10,
                  entropy=0.3, leep_gain=0.7, layers=noisier, top="stage5")
    assert r.similarity == "similar"


def test_the_command_runs_what_was_measured():
    r = recommend(data="my photos", model="timm:resnet18", cache="cache/my photos.h5", per_class_median=15,
                  n_train=150, n_classes=10, entropy=None, leep_gain=None, layers=_layers(RISING),
                  top="stage5", weights="none", decode="exact")
    assert r.command == ("cnncodes extract 'my photos' -m timm:resnet18 -w none --decode exact -l stage5 "
                         "-o 'cache/my photos.h5' && cnncodes fit-svm --cache 'cache/my photos.h5' -l stage5")
    assert "random weights" in " ".join(r.reasons)


def test_a_near_perfect_probe_leaves_fine_tuning_nothing_to_win():
    r = _advice(3000, {**RISING, "stage5": 0.96}, entropy=0.7, gain=0.1)
    assert r.strategy == "linear probe" and "less than 5 points to win" in " ".join(r.reasons)
    assert _advice(3000, {**RISING, "stage5": 0.94}, entropy=0.7, gain=0.1).strategy == "fine-tune everything"


def _run(data, tmp_path, *extra):
    r = CliRunner().invoke(cli, ["advise", str(data), "--report", str(tmp_path / "report"), "--json", "-q",
                                 *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.slow
def test_advise_on_digits_reads_an_earlier_layer(tmp_path):
    from cnncodes.pipelines.sample_data import write_digits
    write_digits(tmp_path / "digits")
    data = tmp_path / "digits"
    a = _run(data, tmp_path, "--sample", "300")
    rec = a["recommendation"]
    # an earlier layer than the top: read it (probe), or keep the network fixed up to it (fine-tune)
    assert rec["layer"] in ("stage3", "stage4") and rec["unfreeze_from"] in (None, "all"), rec
    assert rec["similarity"] == "different" and rec["size"] == "medium"
    assert a["sample"]["images"] == 300 and len(a["layers"]) == 5
    assert a["imagenet_head"]["normalised_entropy"] > 0.6  # ImageNet's head does not know 8x8 strokes
    for name in ("index.html", "advice.md", "advice.json", "advise.png"):
        assert (tmp_path / "report" / name).is_file()


@pytest.mark.slow
@needs_shared
def test_advise_on_caltech_reads_the_top_layer_with_a_probe(tmp_path):
    a = _run(CALTECH, tmp_path)
    rec = a["recommendation"]
    assert (rec["strategy"], rec["layer"], rec["size"]) == ("linear probe", "stage5", "small"), rec
    assert a["imagenet_head"]["normalised_entropy"] < 0.6 and a["imagenet_head"]["leep_gain"] > 0.4
    assert a["size"] == {"train_images": 1515, "classes": 101, "per_class_median": 15.0, "per_class_min": 15,
                         "per_class_max": 15}


def test_a_class_with_one_image_is_left_out_and_named(tmp_path, r18_weights):
    from .conftest import write_image
    for c, n in (("a", 6), ("b", 6), ("lonely", 1)):
        for i in range(n):
            write_image(tmp_path / "d" / c / f"{i}.png", seed=10 * len(c) + i)
    a = _run(tmp_path / "d", tmp_path, "-m", "resnet18", "-w", str(r18_weights))
    assert a["sample"]["classes_left_out"] == ["lonely"] and a["sample"]["images"] == 12
    assert a["imagenet_head"] is not None and a["size"]["classes"] == 3


def test_many_classes_of_few_images_each_are_advised(tmp_path, r18_weights):
    # 40 classes of 3 images: every class smaller than LEEP's and the probes' usual 5 folds
    from .conftest import write_image
    for c in range(40):
        for i in range(3):
            write_image(tmp_path / "d" / f"c{c:02d}" / f"{i}.png", seed=100 * c + i)
    a = _run(tmp_path / "d", tmp_path, "-m", "resnet18", "-w", str(r18_weights))
    assert a["sample"]["images"] == 120 and a["size"]["per_class_median"] == 3
    assert a["recommendation"]["size"] == "small" and a["imagenet_head"]["leep"] < 0


def test_advise_refuses_bad_input_in_one_line(tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    from .conftest import write_image
    for i in range(3):
        write_image(tmp_path / "one" / "only" / f"{i}.png", seed=i)
    r = CliRunner().invoke(cli, ["advise", str(tmp_path / "one")])
    assert r.exit_code == 1 and "advice needs at least 2" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["advise", str(tmp_path / "one"), "--sample", "5"])
    assert r.exit_code == 2 and "--sample" in r.output
