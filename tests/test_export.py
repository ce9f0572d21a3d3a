"""`cnncodes export`: a saved probe and its network as one ONNX file, and `predict` running it with
ONNX Runtime alone (real Lite0 weights, real photos)."""
import csv
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from cnncodes.pipelines.cli import cli

from .conftest import CALTECH, write_image


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _rows(path):
    return {r["path"]: r for r in csv.DictReader(open(path))}


@pytest.fixture(scope="module")
def exported(caltech_cache, tmp_path_factory):
    """An SVM and a softmax probe on the Caltech codes, each saved and exported."""
    out = tmp_path_factory.mktemp("export")
    files = {}
    for clf, extra in (("svm", []), ("softmax", ["--norm", "power"])):
        r = run(f"fit-{clf}", "--cache", caltech_cache, "--c-grid", "0.01,0.1", *extra,
                "--out", out / f"{clf}.npz")
        assert r.exit_code == 0, r.output
        r = run("export", "--model", out / f"{clf}.npz", "--out", out / f"{clf}.onnx", "--codes", "--json")
        assert r.exit_code == 0, r.output
        files[clf] = (out / f"{clf}.npz", out / f"{clf}.onnx", json.loads(r.output))
    return files


@pytest.mark.slow
@pytest.mark.parametrize("clf", ["svm", "softmax"])
def test_exported_model_predicts_as_the_probe_on_every_caltech_test_photo(exported, tmp_path, clf):
    model, onnx_file, summary = exported[clf]
    assert summary["classes"] == 101 and summary["outputs"] == ["probabilities", "scores", "codes"]
    test = sorted(str(p) for p in (CALTECH / "test").rglob("*.jpg"))
    assert len(test) >= 500
    assert run("predict", "--model", model, CALTECH / "test", "--out", tmp_path / "torch.csv").exit_code == 0
    r = run("predict", "--model", onnx_file, CALTECH / "test", "--out", tmp_path / "onnx.csv")
    assert r.exit_code == 0, r.output
    a, b = _rows(tmp_path / "torch.csv"), _rows(tmp_path / "onnx.csv")
    assert sorted(a) == sorted(b) == test
    assert all(a[p]["label"] == b[p]["label"] for p in test)
    worst = max(abs(float(a[p]["probability"]) - float(b[p]["probability"])) for p in test)
    assert worst <= 1e-4, worst
    assert max(abs(float(a[p]["score"]) - float(b[p]["score"])) for p in test) <= 1e-3


@pytest.mark.slow
def test_the_graph_gives_the_probes_probabilities_and_codes(exported):
    """Every class's probability, not only the label's: the graph on the pixels the extraction
    decodes, against the saved probe on the cached codes of the same photos."""
    from cnncodes.pipelines.probes.artifacts import load_model
    from cnncodes.pipelines.probes.onnx_model import OnnxClassifier, preprocess
    model, onnx_file, _ = exported["svm"]
    clf = OnnxClassifier(onnx_file)
    photos = sorted((CALTECH / "test").rglob("*.jpg"))[::50]
    res = clf.run(np.stack([preprocess(p, clf.resize, clf.decode) for p in photos]))
    from cnncodes.extractor.backbones.loading import load_backbone
    from cnncodes.extractor.encoding import encode_images
    codes, errors = encode_images(load_backbone(), photos, ["penultimate"], decode=clf.decode)
    assert not any(errors)
    np.testing.assert_allclose(res["codes"], codes["penultimate"], rtol=1e-4, atol=1e-4)
    m = load_model(model)
    np.testing.assert_allclose(res["probabilities"], m.proba(codes["penultimate"]), atol=1e-4)
    assert clf.classes == [m.classes[int(c)] for c in m.pipeline.classes_]
    recipe = json.loads(clf.info["recipe"])
    assert recipe["model"] == "efficientnet_lite0" and "path" not in recipe and "data_root" not in recipe
    spec = json.loads(clf.info["preprocess"])
    assert spec["decode"] == clf.decode and spec["filter_name"] == "BICUBIC" and len(spec["steps"]) >= 5


@pytest.mark.slow
def test_predict_on_onnx_imports_no_torch_and_reports_its_start_up(exported, tmp_path):
    _, onnx_file, _ = exported["softmax"]
    photo = sorted((CALTECH / "test").rglob("*.jpg"))[0]
    code = ("import sys, time; t = time.perf_counter(); from cnncodes.pipelines.cli import cli\n"
            f"cli(['predict', '--model', {str(onnx_file)!r}, {str(photo)!r}], standalone_mode=False)\n"
            "print('torch' in sys.modules, 'sklearn' in sys.modules, round(time.perf_counter() - t, 2))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    header, row, verdict = out.stdout.strip().splitlines()
    assert header == "path,label,score,probability,error" and row.startswith(str(photo))
    torch_loaded, sklearn_loaded, seconds = verdict.split()
    assert (torch_loaded, sklearn_loaded) == ("False", "False")
    print(f"predict via ONNX: {seconds} s in the process, {wall:.2f} s with the interpreter")  # -s shows it


@pytest.mark.slow
def test_foreign_damaged_newer_and_unexportable_models_are_one_line(exported, tmp_path):
    import onnx
    import torch
    _, onnx_file, _ = exported["svm"]
    photo = write_image(tmp_path / "p.png", seed=1, size=(300, 260))
    # an ONNX model made by another tool
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(tmp_path / "other.onnx"), dynamo=False)
    r = run("predict", "--model", tmp_path / "other.onnx", photo)
    assert r.exit_code == 1 and "not a classifier exported by `cnncodes export`" in r.output
    assert len(r.output.strip().splitlines()) == 1
    # a damaged file
    data = onnx_file.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    r = run("predict", "--model", tmp_path / "cut.onnx", photo)
    assert r.exit_code == 1 and "cannot be read as an ONNX model" in r.output
    assert len(r.output.strip().splitlines()) == 1
    # exported by a newer cnncodes
    m = onnx.load(str(onnx_file))
    for p in m.metadata_props:
        if p.key == "cnncodes_format_version":
            p.value = "99"
    onnx.save(m, str(tmp_path / "newer.onnx"))
    r = run("predict", "--model", tmp_path / "newer.onnx", photo)
    assert r.exit_code == 1 and "newer than this cnncodes reads" in r.output
    # a good one on a photo and a broken file: a row each
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff nothing")
    r = run("predict", "--model", onnx_file, photo, tmp_path / "broken.jpg", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0 and "1 of 2 images could not be read" in r.output
    rows = _rows(tmp_path / "p.csv")
    assert rows[str(photo)]["label"] and rows[str(photo)]["error"] == ""
    assert rows[str(tmp_path / "broken.jpg")]["label"] == "" and rows[str(tmp_path / "broken.jpg")]["error"]
    # export refuses to overwrite, and a k-NN probe
    r = run("export", "--model", exported["svm"][0], "--out", onnx_file)
    assert r.exit_code == 1 and "--overwrite" in r.output
    # metadata edited so that it no longer fits the graph: refused when loading, in one line
    for key, value in (("cnncodes_classes", '["a"]'), ("cnncodes_resize", '{"size": 256}'),
                       ("cnncodes_decode", "future"), ("cnncodes_format_version", "x1")):
        m = onnx.load(str(onnx_file))
        for p in m.metadata_props:
            if p.key == key:
                p.value = value
        onnx.save(m, str(tmp_path / "edited.onnx"))
        r = run("predict", "--model", tmp_path / "edited.onnx", photo)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, (key, r.output)
    # the ONNX path runs on the CPU with ONNX Runtime: options of the torch path are refused
    r = run("predict", "--model", onnx_file, photo, "--runtime", "openvino")
    assert r.exit_code == 1 and "--runtime" in r.output
    # a saved probe renamed .onnx is still read as the probe it is
    from cnncodes.pipelines.probes.onnx_model import is_onnx
    (tmp_path / "probe.onnx").write_bytes(exported["svm"][0].read_bytes())
    assert not is_onnx(tmp_path / "probe.onnx") and is_onnx(onnx_file)


@pytest.mark.slow
def test_export_refuses_a_knn_probe(caltech_cache, tmp_path):
    r = run("fit-knn", "--cache", caltech_cache, "--k-grid", "5", "--out", tmp_path / "knn.npz")
    assert r.exit_code == 0, r.output
    r = run("export", "--model", tmp_path / "knn.npz", "--out", tmp_path / "knn.onnx")
    assert r.exit_code == 1 and "linear probes" in r.output and not (tmp_path / "knn.onnx").exists()


def test_a_fine_tuned_run_exports_whole_and_predicts_as_its_network(tmp_path):
    """``export --run``: the run's best.pt network after the weights' normalisation; the graph's
    probabilities are the network's softmax on the same pixels."""
    import torch

    from cnncodes.pipelines.finetune.training import finetune
    from cnncodes.pipelines.probes.onnx_model import OnnxClassifier, preprocess

    from .test_finetune import tiny_config, write_many
    data = write_many(tmp_path / "data", per_class=6)
    finetune(tiny_config(data, tmp_path / "run", stages="head:1"), progress=False)
    r = run("export", "--run", tmp_path / "run", "--out", tmp_path / "run.onnx", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["classes"] == 3
    clf = OnnxClassifier(tmp_path / "run.onnx")
    assert clf.classes == ["a", "b", "c"] and clf.info["classifier"] == "finetune"
    photos = sorted((data / "test").rglob("*.png"))
    pixels = np.stack([preprocess(p, clf.resize, clf.decode) for p in photos])
    got = clf.run(pixels)
    from cnncodes.extractor import load_backbone
    from cnncodes.extractor.layers import Probe

    from cnncodes.pipelines.finetune.checkpoints import load_checkpoint
    from cnncodes.pipelines.finetune.freezing import replace_head
    bb = load_backbone("timm:test_efficientnet", "none")
    replace_head(bb.model, Probe(bb.model, bb.input_size, "t"), 3)
    bb.model.load_state_dict(load_checkpoint(tmp_path / "run" / "best.pt")["model"])
    x = bb.split.batch(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    with torch.inference_mode():
        want = torch.softmax(bb.model.eval()(x), 1).numpy()
    np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)
    r = run("predict", "--model", tmp_path / "run.onnx", data / "test")
    assert r.exit_code == 0 and r.output.count("\n") == len(photos) + 1
    r = run("export", "--run", tmp_path / "run", "--model", tmp_path / "x.npz", "--out", tmp_path / "y.onnx")
    assert r.exit_code == 2  # --model must exist: click refuses it first
    r = run("export", "--out", tmp_path / "y.onnx")
    assert r.exit_code == 1 and "one of --model" in r.output


@pytest.mark.parametrize("clf,extra", [("svm", ["--pca", "4", "--norm", "l2"]),
                                       ("softmax", ["--pca", "whiten"])])
def test_binary_probes_with_pca_export_and_agree(tmp_path, photos, clf, extra):
    """Two classes (one decision column) and PCA (whitened too) in the graph, on generated photos."""
    assert run("extract", photos, "--out", tmp_path / "c.h5", "-q", "--layer", "stage4").exit_code == 0
    r = run(f"fit-{clf}", "--cache", tmp_path / "c.h5", "--folds", "2", "--c-grid", "0.1,1", *extra,
            "--out", tmp_path / "m.npz")
    assert r.exit_code == 0, r.output
    assert run("export", "--model", tmp_path / "m.npz", "--out", tmp_path / "m.onnx").exit_code == 0
    assert run("predict", "--model", tmp_path / "m.npz", photos, "--out", tmp_path / "a.csv").exit_code == 0
    assert run("predict", "--model", tmp_path / "m.onnx", photos, "--out", tmp_path / "b.csv").exit_code == 0
    a, b = _rows(tmp_path / "a.csv"), _rows(tmp_path / "b.csv")
    assert len(a) == 12 and all(a[p]["label"] == b[p]["label"] for p in a)
    assert max(abs(float(a[p]["probability"]) - float(b[p]["probability"])) for p in a) <= 1e-4
    assert max(abs(float(a[p]["score"]) - float(b[p]["score"])) for p in a) <= 1e-3


def test_an_svm_saved_before_calibration_exports_without_probabilities(tmp_path, photos):
    from cnncodes.pipelines.probes.artifacts import load_model, save_model
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    assert run("extract", photos, "--out", tmp_path / "c.h5", "-q", "--layer", "stage4").exit_code == 0
    r = fit_linear_probe(tmp_path / "c.h5", classifier="svm", folds=2, c_grid="1")
    r.calibration = None   # as cnncodes wrote models before the temperature existed
    save_model(r, tmp_path / "old.npz")
    assert load_model(tmp_path / "old.npz").temperature is None
    assert run("export", "--model", tmp_path / "old.npz", "--out", tmp_path / "old.onnx").exit_code == 0
    r = run("predict", "--model", tmp_path / "old.onnx", photos, "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert all(row["label"] and row["probability"] == "" for row in _rows(tmp_path / "p.csv").values())


def test_pooling_the_tracer_cannot_export_is_one_line(tmp_path, photos):
    assert run("extract", photos, "--out", tmp_path / "c.h5", "-q", "--layer", "stage3",
               "--pool", "spp:1,2").exit_code == 0
    assert run("fit-svm", "--cache", tmp_path / "c.h5", "--folds", "2", "--c-grid", "1",
               "--out", tmp_path / "m.npz").exit_code == 0
    r = run("export", "--model", tmp_path / "m.npz", "--out", tmp_path / "m.onnx")
    if r.exit_code == 0:   # a torch whose tracer follows the pooling: the graph was checked
        assert (tmp_path / "m.onnx").exists()
    else:
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
        assert not (tmp_path / "m.onnx").exists()
        assert not list(tmp_path.glob(".m.onnx*"))   # no temporary left behind
