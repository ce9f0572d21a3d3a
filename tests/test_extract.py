"""End to end: images -> real HDF5 cache, with resume after real interrupts."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from cnncodes.extractor.errors import CacheError, CacheLockedError, ImageDecodeError, IncompatibleCacheError
from cnncodes.extractor.journal import Journal
from cnncodes.extractor.writer import CacheWriter

from cnncodes import extractor

from .conftest import write_image

LAYERS = ["layer2", "penultimate"]


def _extract(data, out, weights, **kw):
    kw.setdefault("layers", LAYERS)
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    return extractor.extract(data, out, model="resnet18", weights=str(weights), **kw)


def test_extract_writes_codes_equal_to_the_plain_network(image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    r = _extract(image_folder, out, r18_weights)
    assert (r.state, r.done, r.failed, r.complete) == ("created", 12, 0, True)
    assert r.layers == {"layer2": 128, "penultimate": 512}
    bb = extractor.load_backbone("resnet18", str(r18_weights))
    x = torch.stack([bb.transform(extractor.load_rgb(image_folder / "dog/1.png"))])
    seen = {}
    bb.model.layer2.register_forward_hook(lambda m, i, o: seen.__setitem__("l2", o.mean((2, 3))))
    bb.model.fc.register_forward_pre_hook(lambda m, i: seen.__setitem__("pen", i[0]))
    with torch.no_grad():
        bb.model(x)
    with h5py.File(out, "r") as f:  # plain h5py, no cnncodes import needed to read it
        row = [p.decode() for p in f["images/path"][()]].index("dog/1.png")
        np.testing.assert_allclose(f["codes/layer2"][row], seen["l2"][0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f["codes/penultimate"][row], seen["pen"][0].numpy(), rtol=1e-4, atol=1e-5)
        assert f["codes/layer2"].attrs["module"] == "layer2" and f["codes/layer2"].attrs["stride"] == 8
        assert f.attrs["complete"] and f.attrs["model"] == "resnet18"
        assert "sha256" in f.attrs["weights"] and "torch" in f.attrs["versions"]


def test_cpu_lanes_and_worker_processes_give_the_same_codes(image_folder, tmp_path, r18_weights):
    # workers=None on a CPU: one decode-and-compute lane per core; workers=2: DataLoader
    # processes feeding one multi-threaded forward pass. Same rows, same codes (to float noise).
    threads = torch.get_num_threads()
    a = _extract(image_folder, tmp_path / "lanes.h5", r18_weights, batch_size=3)
    b = _extract(image_folder, tmp_path / "loader.h5", r18_weights, batch_size=3, workers=2)
    assert a.done == b.done == 12
    with extractor.open_cache(tmp_path / "lanes.h5") as ca, \
            extractor.open_cache(tmp_path / "loader.h5") as cb:
        for layer in LAYERS:
            np.testing.assert_allclose(ca.codes(layer), cb.codes(layer), rtol=1e-4, atol=1e-5)
    assert torch.get_num_threads() == threads  # the lanes' single-threading is undone


def test_rerun_is_up_to_date_and_other_recipes_are_refused(image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights)
    before = out.stat().st_mtime_ns
    r = _extract(image_folder, out, r18_weights, layers=["penultimate"])  # a subset is fine
    assert r.state == "up to date" and r.processed == 0 and out.stat().st_mtime_ns == before
    with pytest.raises(IncompatibleCacheError, match="pooling: 'avg' in the cache, 'max' requested"):
        _extract(image_folder, out, r18_weights, pool="max")
    write_image(image_folder / "cat" / "new.png", seed=5)
    with pytest.raises(IncompatibleCacheError, match="image list differs"):
        _extract(image_folder, out, r18_weights)
    r = _extract(image_folder, out, r18_weights, pool="max", overwrite=True)
    assert r.state == "created" and r.done == 13


def test_missing_layers_are_added_to_an_existing_cache(image_folder, tmp_path, r18_weights):
    out, alone = tmp_path / "c.h5", tmp_path / "alone.h5"
    _extract(image_folder, out, r18_weights)
    with h5py.File(out, "r") as f:
        before = {k: f["codes"][k][()] for k in f["codes"]}
    r = _extract(image_folder, out, r18_weights, layers=["layer3", "penultimate"])
    assert r.state == "layers added" and set(r.layers) == {*before, "layer3"} and r.complete
    _extract(image_folder, alone, r18_weights, layers=["layer3"])
    with h5py.File(out, "r") as f, h5py.File(alone, "r") as g:
        assert json.loads(f.attrs["layers"]) == [*before, "layer3"] and f.attrs["complete"]
        np.testing.assert_array_equal(f["codes/layer3"][()], g["codes/layer3"][()])
        assert f["codes/layer3"].attrs["module"] == "layer3" and \
            0 < f["codes/layer3"].attrs["relative_depth"] < 1
        for k, v in before.items():
            np.testing.assert_array_equal(f["codes"][k][()], v)
    assert sorted(p.name for p in tmp_path.glob("*.h5*")) == ["alone.h5", "c.h5"]  # no companion left
    assert _extract(image_folder, out, r18_weights, layers=["layer3"]).state == "up to date"


def test_overwrite_discards_an_interrupted_layer_addition(image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    companion = tmp_path / "c.h5.adding.h5"
    _extract(image_folder, out, r18_weights)
    _extract(image_folder, companion, r18_weights, layers=["layer3"])  # as a killed addition leaves it
    with CacheWriter(companion):  # while another process is at it, nothing is deleted
        with pytest.raises(CacheLockedError, match="being written by another"):
            _extract(image_folder, out, r18_weights, pool="max", overwrite=True)
        assert companion.exists()
        (tmp_path / "c.h5.adding.h5.journal" / "rows-000000000000-000000000003.npz").write_bytes(b"x")
    assert (tmp_path / "c.h5.adding.h5.journal").is_dir()  # a shard keeps the journal
    r = _extract(image_folder, out, r18_weights, pool="max", overwrite=True)
    assert r.state == "created"
    assert sorted(p.name for p in tmp_path.glob("c.h5*")) == ["c.h5"]


def test_non_hdf5_output_is_never_overwritten_silently(image_folder, tmp_path, r18_weights):
    out = tmp_path / "notes.h5"
    out.write_text("precious")
    with pytest.raises(CacheError, match="not an HDF5 file.*--overwrite"):
        _extract(image_folder, out, r18_weights)
    assert out.read_text() == "precious"


def test_bad_images_are_recorded_and_skipped(image_folder, tmp_path, r18_weights):
    good = (image_folder / "cat" / "0.png").read_bytes()
    (image_folder / "cat" / "trunc.png").write_bytes(good[: len(good) // 3])
    (image_folder / "dog" / "empty.jpg").write_bytes(b"")
    (image_folder / "eel" / "readme.txt").write_text("not an image")
    out = tmp_path / "c.h5"
    r = _extract(image_folder, out, r18_weights)
    assert (r.done, r.failed, r.complete) == (12, 3, True)
    assert {p for p, _ in r.failures} == {"cat/trunc.png", "dog/empty.jpg", "eel/readme.txt"}
    with extractor.open_cache(out) as c:
        errors = dict(zip(c.paths, c.errors))
        assert "empty file" in errors["dog/empty.jpg"] and errors["cat/0.png"] == ""
        assert c.summary()["failed"] == 3
    with pytest.raises(ImageDecodeError, match="--strict"):
        _extract(image_folder, tmp_path / "s.h5", r18_weights, strict=True)


def test_split_folders_and_float16(split_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    _extract(split_folder, out, r18_weights, dtype="float16", pool="grid:2", layers=["stage3"])
    with extractor.open_cache(out) as c:
        assert c.codes("stage3").dtype == np.float16 and c.codes("stage3").shape == (14, 512)
        assert c.layer_attrs("stage3")["module"] == "layer2"
        assert sorted(set(c.splits)) == ["test", "train"]


def test_a_second_writer_is_refused(image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights)
    write_image(image_folder / "cat" / "x.png", seed=1)
    with CacheWriter(out):
        with pytest.raises(CacheLockedError):
            _extract(image_folder, out, r18_weights, overwrite=True)


def _big_folder(root, n=120):
    for i in range(n):
        write_image(root / f"c{i % 3}" / f"{i:03d}.png", seed=i)
    return root


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A suite started in the background by a shell without job control inherits SIGINT ignored,
    # and so would the child (Python then never raises KeyboardInterrupt): restore the default.
    return subprocess.Popen([sys.executable, "-m", "cnncodes", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_shards(out, n, proc, timeout=120):
    t0 = time.time()
    while len(Journal(out).shards()) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "no progress"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_identical_result(tmp_path, r18_weights, sig):
    n = 120
    data = _big_folder(tmp_path / "big", n)
    ref = tmp_path / "ref.h5"
    _extract(data, ref, r18_weights, batch_size=2)
    out = tmp_path / "killed.h5"
    args = [str(data), "--out", str(out), "--model", "resnet18", "--weights", str(r18_weights),
            "--layer", "layer2", "--layer", "penultimate", "--batch-size", "2", "--quiet"]
    proc = _cli("extract", *args)
    _wait_for_shards(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun the same command to resume" in err
        assert not Journal(out).shards()  # committed into the cache on the way out
    else:
        assert proc.returncode == -9 and Journal(out).shards()
    with extractor.open_cache(out) as c:  # the file at the path is always a valid, incomplete cache
        assert not c.complete
        s = c.summary()
        assert 0 < s["done"] + s["unmerged_rows"] < n
    r = _extract(data, out, r18_weights, batch_size=2)
    assert r.state == "resumed" and r.complete and 0 < r.processed < n
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        for layer in LAYERS:
            assert np.array_equal(a[f"codes/{layer}"][()], b[f"codes/{layer}"][()])  # bitwise
        assert np.array_equal(a["images/status"][()], b["images/status"][()])
    assert not Journal(out).dir.exists() and not (tmp_path / "killed.h5.work").exists()
