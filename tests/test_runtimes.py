"""Inference runtimes (OpenVINO, ONNX Runtime) for CPU extraction: the same codes as PyTorch on
tiny models of every family and on Lite0 with real photos, the choice and its fallbacks,
resume under a runtime, and a cache never continued by another runtime."""
from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cnncodes.extractor import extract, load_backbone
from cnncodes.extractor import runtimes as R
from cnncodes.extractor.encoding import prepare_model
from cnncodes.extractor.errors import IncompatibleCacheError
from cnncodes.extractor.layers import Probe
from cnncodes.extractor.pooling import parse_pooling

from cnncodes.pipelines.cli import cli

from .conftest import CALTECH

RUNTIMES = [r for r in R.PREFERENCE if R.runtime_version(r)]
needs_runtime = pytest.mark.skipif(not RUNTIMES, reason="no inference runtime installed")
CPU = torch.device("cpu")


def _codes(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {k: f["codes"][k][()] for k in f["codes"]}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# --- same codes, every family ------------------------------------------------------------------------

@needs_runtime
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("model, layers, pool", [
    ("timm:test_resnet", ["layer2", "penultimate"], "avg"),
    ("timm:test_convnext", ["stage3", "stage4"], "avgmax"),
    ("timm:test_efficientnet", ["stage2", "blocks.3"], "grid:2"),
    ("mobilenet_v3_small", ["features.6"], "max"),
    ("resnet18", ["layer3"], "spp:1,2"),
    ("vgg11", ["features.10"], "avg"),
    ("timm:test_vit", ["block:2", "penultimate"], "cls+mean"),
])
def test_runtime_codes_match_pytorch_on_every_family(model, layers, pool, runtime):
    bb = load_backbone(model, "none")
    probe = Probe(bb.model, bb.input_size, model)
    taps = probe.resolve(layers)
    pooling = parse_pooling(pool)
    net = prepare_model(bb, taps, CPU)
    rt, used = R.compile_taps(R.label(runtime), net, taps, pooling, bb.input_size, model, 2, strict=True,
                              split=bb.split)
    assert used == R.label(runtime) and isinstance(rt, R.RuntimeTaps)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, bb.input_size, bb.input_size, 3), dtype=torch.uint8, generator=g)
    diffs = R.differences(rt, net, taps, pooling, x.permute(0, 3, 1, 2), bb.split)
    assert set(diffs) == set(layers) and max(diffs.values()) <= R.TOLERANCE, diffs


@needs_runtime
@pytest.mark.skipif(not CALTECH.exists(), reason="needs ../shared/datasets")
def test_lite0_on_real_photos_within_1e5_of_pytorch_per_layer(tmp_path):
    files = sorted((CALTECH / "train").glob("*/*.jpg"))[::25][:40]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    layers = ["blocks.2", "blocks.4", "blocks.6", "penultimate"]
    ref = extract(manifest, tmp_path / "torch.h5", layers=layers, runtime="torch", progress=False)
    assert ref.runtime == "torch"
    for runtime in RUNTIMES:
        r = extract(manifest, tmp_path / f"{runtime}.h5", layers=layers, runtime=runtime, progress=False)
        assert r.runtime == R.label(runtime) and r.done == len(files)
        got, want = _codes(r.path), _codes(ref.path)
        diffs = {k: _relative(got[k], want[k]) for k in layers}
        assert max(diffs.values()) <= R.TOLERANCE, (runtime, diffs)
        with h5py.File(r.path) as f:
            assert f.attrs["runtime"] == R.label(runtime)


# --- the choice and its fallbacks --------------------------------------------------------------------

def test_auto_picks_the_fastest_installed_runtime_on_a_cpu_only(monkeypatch):
    installed = {"openvino": "2026.4.1", "onnxruntime": "1.32.0"}
    monkeypatch.setattr(R, "runtime_version", lambda name: installed.get(name))
    assert R.resolve_runtime("auto", CPU, "fp32") == "openvino 2026.4.1"
    assert R.resolve_runtime("auto", torch.device("cuda"), "bf16") == "torch"   # GPU paths unchanged
    assert R.resolve_runtime("auto", CPU, "bf16") == "torch"
    assert R.resolve_runtime("auto", CPU, "fp32", cached="onnxruntime 1.32.0") == "onnxruntime 1.32.0"
    assert R.resolve_runtime("auto", CPU, "fp32", cached="torch") == "torch"   # a cache keeps its runtime
    assert R.resolve_runtime("onnxruntime", CPU, "fp32") == "onnxruntime 1.32.0"
    with pytest.raises(R.RuntimeUnavailableError, match="runs on the CPU, not on cuda"):
        R.resolve_runtime("openvino", torch.device("cuda"), "fp32")
    del installed["openvino"]
    assert R.resolve_runtime("auto", CPU, "fp32") == "onnxruntime 1.32.0"
    with pytest.raises(R.RuntimeUnavailableError, match=r"not installed: pip install 'cnncodes\[openvino\]'"):
        R.resolve_runtime("openvino", CPU, "fp32")
    installed.clear()
    assert R.resolve_runtime("auto", CPU, "fp32") == "torch"
    monkeypatch.setenv("CNNCODES_RUNTIME", "onnxruntime")   # the default of --runtime
    assert R.requested(None) == "onnxruntime" and R.requested("auto") == "auto"


@needs_runtime
def test_auto_falls_back_to_pytorch_with_one_line_when_export_fails(photos, tmp_path, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX is not supported\nmore")
    monkeypatch.setattr(R, "export_onnx", broken)
    with caplog.at_level(logging.WARNING):
        r = extract(photos, tmp_path / "c.h5", model="timm:test_resnet", weights="none", layers=["layer2"],
                    runtime="auto", progress=False)
    assert r.runtime == "torch" and r.done == 12
    lines = [m for m in caplog.messages if "cannot run" in m]
    assert len(lines) == 1 and "aten::frobnicate" in lines[0] and "running it with PyTorch" in lines[0]
    with h5py.File(r.path) as f:
        assert f.attrs["runtime"] == "torch"
    res = CliRunner().invoke(cli, ["extract", str(photos), "-m", "timm:test_resnet", "-w", "none",
                                   "-l", "layer2",
                                   "--runtime", RUNTIMES[0], "-o", str(tmp_path / "d.h5")])
    assert res.exit_code == 1 and f"--runtime {RUNTIMES[0]} cannot run timm:test_resnet" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "d.h5").exists()


@needs_runtime
def test_codes_that_do_not_match_pytorch_are_not_used(photos, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(R, "TOLERANCE", 0.0)   # no runtime matches PyTorch to the last bit
    with caplog.at_level(logging.WARNING):
        r = extract(photos, tmp_path / "c.h5", model="timm:test_resnet", weights="none", layers=["layer2"],
                    runtime="auto", progress=False)
    assert r.runtime == "torch" and any("differ from PyTorch's" in m for m in caplog.messages)


# --- the export cache, resume, another runtime's cache -----------------------------------------------

@needs_runtime
def test_the_exported_graph_is_cached_by_recipe(tmp_path):
    bb = load_backbone("timm:test_resnet", "none")
    probe = Probe(bb.model, bb.input_size)
    net = prepare_model(bb, probe.resolve(["layer2"]), CPU)
    a = R.export_onnx(net, probe.resolve(["layer2"]), parse_pooling("avg"), bb.input_size, "m", bb.split)
    stamp = a.stat().st_mtime_ns
    assert R.export_onnx(net, probe.resolve(["layer2"]), parse_pooling("avg"), bb.input_size, "m",
                         bb.split) == a and a.stat().st_mtime_ns == stamp
    b = R.export_onnx(net, probe.resolve(["layer3"]), parse_pooling("avg"), bb.input_size, "m", bb.split)
    c = R.export_onnx(net, probe.resolve(["layer2"]), parse_pooling("max"), bb.input_size, "m", bb.split)
    assert len({a, b, c}) == 3 and a.parent == R.runtime_dir() and a.parent.parent.name == "hub"


@needs_runtime
def test_resume_under_a_runtime_is_bitwise_the_uninterrupted_run(photos, tmp_path):
    out = tmp_path / "c.h5"
    kw = dict(model="timm:test_resnet", weights="none", layers=["layer2", "layer3"], batch_size=4,
              runtime=RUNTIMES[0], progress=False)
    torch.manual_seed(0)   # the same random weights in both runs ("none" initialises them)
    first = extract(photos, out, **kw)
    whole = _codes(out)
    with h5py.File(out, "r+") as f:   # rows 4..11 (two fixed blocks) never made it, as after a kill
        f["images/status"][4:] = 0
        for k in f["codes"]:
            f["codes"][k][4:] = 0
        f.attrs["complete"] = False
    torch.manual_seed(0)
    again = extract(photos, out, **kw)
    assert first.runtime == again.runtime == R.label(RUNTIMES[0]) and again.state == "resumed"
    assert again.processed == 8
    for k, v in _codes(out).items():
        assert np.array_equal(v, whole[k]), k


@needs_runtime
def test_resume_of_a_block_with_a_failed_image_is_bitwise_too(photos, tmp_path):
    (photos / "a" / "2.png").write_bytes(b"not a png")   # row 2 fails: its block computes 3 images
    out = tmp_path / "c.h5"
    kw = dict(model="timm:test_resnet", weights="none", layers=["layer2"], batch_size=4,
              runtime=RUNTIMES[0], progress=False)
    torch.manual_seed(0)
    assert extract(photos, out, **kw).failed == 1
    whole = _codes(out)
    with h5py.File(out, "r+") as f:
        f["images/status"][0:4] = 0
        f["codes/layer2"][0:4] = 0
        f.attrs["complete"] = False
    torch.manual_seed(0)
    again = extract(photos, out, **kw)
    assert again.processed == 4 and again.failed == 1
    assert np.array_equal(_codes(out)["layer2"], whole["layer2"])


@needs_runtime
def test_a_cache_whose_runtime_is_gone_is_read_but_not_continued(photos, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    kw = dict(model="timm:test_resnet", weights="none", layers=["layer2"], progress=False)
    made_by = extract(photos, out, runtime=RUNTIMES[0], **kw).runtime
    import cnncodes.extractor.cache_run as cache_run
    for module in (R, cache_run):   # uninstalled since
        monkeypatch.setattr(module, "runtime_version", lambda name: None)
    assert extract(photos, out, runtime="auto", **kw).state == "up to date"   # nothing to compute
    with h5py.File(out, "r+") as f:
        f["images/status"][0] = 0
        f.attrs["complete"] = False
    want = (rf"holds codes computed by {made_by}, which cannot compute its missing rows "
            rf"\({RUNTIMES[0]} here is not installed\).*pip install")
    with pytest.raises(IncompatibleCacheError, match=want):
        extract(photos, out, runtime="auto", **kw)


@needs_runtime
def test_a_cache_of_one_runtime_is_never_continued_by_another(photos, tmp_path):
    out = tmp_path / "c.h5"
    kw = dict(model="timm:test_resnet", weights="none", layers=["layer2"], progress=False)
    extract(photos, out, runtime="torch", **kw)
    with pytest.raises(IncompatibleCacheError, match=rf"runtime: 'torch' in the cache, "
                                                     rf"'{R.label(RUNTIMES[0])}' requested"):
        extract(photos, out, runtime=RUNTIMES[0], **kw)
    assert extract(photos, out, runtime="auto", **kw).state == "up to date"   # auto keeps the cache's


@needs_runtime
def test_predict_and_sweep_take_the_runtime(photos, tmp_path):
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])
    r = run("sweep", photos, "-m", "timm:test_resnet", "-w", "none", "--layers", "layer2",
            "--classifier", "softmax",
            "--folds", "2", "--c-grid", "1", "--cache", tmp_path / "c.h5", "--report", tmp_path / "rep",
            "--runtime", RUNTIMES[0], "--quiet")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["runtime"] == R.label(RUNTIMES[0])
    r = run("fit-svm", "--cache", tmp_path / "c.h5", "--layer", "layer2", "--folds", "2",
            "--out", tmp_path / "svm.joblib")
    assert r.exit_code == 0, r.output
    r = run("predict", "--model", tmp_path / "svm.joblib", photos / "a", "--runtime", RUNTIMES[0])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 7


@needs_runtime
def test_a_failed_export_writes_nothing_to_stdout(photos, tmp_path, capfd):
    # adaptive pooling to 3x3 of a 10x10 grid has no ONNX form: auto falls back to PyTorch
    r = extract(photos, tmp_path / "c.h5", model="timm:test_vit", weights="none", layers=["stage2"],
                pool="grid:3", runtime="auto", progress=False)
    out, err = capfd.readouterr()
    assert r.runtime == "torch" and out == "" and "Torch IR graph" not in err
