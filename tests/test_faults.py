"""Hostile cases: nothing lost, nothing stale, one line instead of a traceback.

Each case checks the exit code, that stderr is one line without "Traceback", and the data
afterwards.
"""
from __future__ import annotations

import os

import h5py
import numpy as np
from click.testing import CliRunner
from PIL import Image

from cnncodes.pipelines.cli import cli

from cnncodes import extractor

from .conftest import write_image
from .test_extract import LAYERS, _extract
from .test_finetune import write_many


def _codes(path, layer="penultimate"):
    with extractor.open_cache(path) as c:
        return dict(zip(c.paths, c.codes(layer)))


def one_line_error(result, *words, code=1):
    """The CLI failed with exit ``code`` and one line of error, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# --- content-true caches -------------------------------------------------------------------------

def test_a_same_size_change_of_an_image_is_extracted_again(tmp_path, r18_weights):
    data = tmp_path / "bmp"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(3):
            (data / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(data / cls / f"{i}.bmp")
    out = tmp_path / "c.h5"
    _extract(data, out, r18_weights)
    before = _codes(out)
    target = data / "a" / "1.bmp"
    size = target.stat().st_size
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(target)  # same size, new pixels
    assert target.stat().st_size == size
    r = _extract(data, out, r18_weights)
    assert (r.state, r.processed, r.done) == ("resumed", 1, 6)
    after = _codes(out)
    fresh = _codes(_extract(data, tmp_path / "fresh.h5", r18_weights).path)
    for path in fresh:
        np.testing.assert_array_equal(after[path], fresh[path])  # bitwise a fresh extraction
    assert not np.array_equal(after["a/1.bmp"], before["a/1.bmp"])
    assert _extract(data, out, r18_weights).state == "up to date"


def test_a_touched_file_is_checked_by_content_and_not_extracted_again(image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights)
    target = image_folder / "dog" / "2.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = _extract(image_folder, out, r18_weights)
    assert (r.state, r.processed) == ("up to date", 0)
    with h5py.File(out, "r") as f:
        row = [p.decode() for p in f["images/path"][()]].index("dog/2.png")
        assert f["images/mtime_ns"][row] == st.st_mtime_ns + 10**9  # recorded: the next check is cheap
    assert extractor.plan_extraction(out, r.path and _recipe_of(out), LAYERS).action == "up to date"


def _recipe_of(path):
    with extractor.open_cache(path) as c:
        return extractor.Recipe.from_attrs(c.attrs)


def test_a_changed_image_is_extracted_again_for_every_layer_when_layers_are_added(image_folder, tmp_path,
                                                                               r18_weights):
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights, layers=["penultimate"])
    write_image(image_folder / "cat" / "0.png", seed=999)  # other pixels (and likely another size)
    r = _extract(image_folder, out, r18_weights, layers=["layer2", "penultimate"])
    assert r.state == "layers added" and r.done == 12
    fresh = tmp_path / "fresh.h5"
    _extract(image_folder, fresh, r18_weights)
    for layer in LAYERS:
        a, b = _codes(out, layer), _codes(fresh, layer)
        for path in b:
            np.testing.assert_allclose(a[path], b[path], rtol=1e-5, atol=1e-6)


def test_an_unreadable_image_error_names_the_file_not_a_memory_address(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not an image at all")
    try:
        extractor.load_rgb(bad)
    except Exception as e:  # noqa: BLE001
        assert "'x.jpg'" in str(e) and "0x" not in str(e)
    else:
        raise AssertionError("a text file decoded")


def test_info_reports_a_damaged_journal_shard_instead_of_crashing(image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights)
    journal = out.with_name(out.name + ".journal")
    journal.mkdir()
    (journal / "rows-000000000000-000000000003.npz").write_bytes(b"PK\x03\x04 damaged")
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 0 and "Traceback" not in result.output


def test_a_hand_made_shard_with_rows_out_of_range_is_dropped_and_redone(image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights, layers=["penultimate"])
    before = _codes(out)
    with h5py.File(out, "r+") as f:  # make the cache unfinished, as an interrupted run leaves it
        f["images/status"][0] = 0
        f.attrs["complete"] = False
    journal = out.with_name(out.name + ".journal")
    journal.mkdir()
    np.savez(journal / "rows-000000000000-000000000099.npz", rows=np.array([0, 99]), status=np.array([1, 1]),
             errors=np.array(["", ""]), **{"codes/penultimate": np.zeros((2, 512), np.float32)})
    for _ in range(2):  # every rerun copes, not just the first
        r = _extract(image_folder, out, r18_weights, layers=["penultimate"])
        assert r.done == 12 and r.complete
    after = _codes(out)
    for path in before:
        np.testing.assert_array_equal(after[path], before[path])


# --- a full disk ---------------------------------------------------------------------------------

def _cli_extract(data, out, weights, *extra):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "cnncodes", "extract", str(data),
                           "--out", str(out), "--model",
                           "resnet18", "--weights", str(weights), "-b", "2", "-q", *extra],
                          capture_output=True, text=True, timeout=300)


def test_a_full_disk_stops_with_one_line_and_the_rerun_resumes_bitwise(image_folder, tmp_path, r18_weights):
    import subprocess
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(small)],
                             capture_output=True).returncode == 0
    if not mounted:
        import pytest
        pytest.skip("cannot mount a small tmpfs here (needs root); the patched-writer case covers it")
    try:
        args = ("--layer", "layer2", "--pool", "none")  # 100,352 floats per image: the disk fills fast
        first = _cli_extract(image_folder, small / "c.h5", r18_weights, *args)
        assert first.returncode == 1, first.stderr[-3000:]
        lines = first.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in first.stderr, first.stderr[-3000:]
        assert lines[0].startswith("Error: no space left on the device of") and \
            "rerun the same command" in lines[0]
        assert not (small / "c.h5.work").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        again = _cli_extract(image_folder, small / "c.h5", r18_weights, *args)
        assert again.returncode == 0 and "resumed, 12/12 images done" in again.stdout, again.stderr[-2000:]
        fresh = _cli_extract(image_folder, tmp_path / "fresh.h5", r18_weights, *args)
        assert fresh.returncode == 0
        a, b = _codes(small / "c.h5", "layer2"), _codes(tmp_path / "fresh.h5", "layer2")
        for path in b:
            np.testing.assert_array_equal(a[path], b[path])
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_a_write_error_of_the_journal_is_one_line_and_loses_nothing(image_folder, tmp_path, r18_weights,
                                                                      monkeypatch):
    import errno

    from cnncodes.extractor.journal import Journal
    real = Journal.write
    calls = []

    def full(self, *a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)
    monkeypatch.setattr(Journal, "write", full)
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "--model", "resnet18",
                                      "--weights", str(r18_weights), "-b", "2", "-q",
                                      "-l", "layer2", "-l", "penultimate"])
    one_line_error(result, "no space left on the device of", "images are saved", "free space and rerun")
    monkeypatch.setattr(Journal, "write", real)
    r = _extract(image_folder, out, r18_weights, batch_size=2)
    assert r.state == "resumed" and r.done == 12 and r.processed < 12
    fresh = _codes(_extract(image_folder, tmp_path / "fresh.h5", r18_weights, batch_size=2).path)
    got = _codes(out)
    for path in fresh:
        np.testing.assert_array_equal(got[path], fresh[path])


def test_a_read_only_output_folder_is_one_line(image_folder, tmp_path, r18_weights):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores mode bits: make it truly read-only with a mount
            import subprocess
            if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)],
                              capture_output=True).returncode:
                import pytest
                pytest.skip("cannot make a read-only folder here")
            subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True)
        result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(ro / "c.h5"), "--model",
                                          "resnet18", "--weights", str(r18_weights), "-q"])
        one_line_error(result, str(ro))
    finally:
        import subprocess
        subprocess.run(["umount", str(ro)], capture_output=True)
        ro.chmod(0o755)


# --- input validation ----------------------------------------------------------------------------

def test_skipped_inputs_are_counted_and_named(image_folder, tmp_path, r18_weights):
    os.symlink(image_folder / "nowhere.png", image_folder / "cat" / "broken.png")
    os.symlink(image_folder / "cat" / "loop.png", image_folder / "cat" / "loop.png")
    write_image(image_folder / "dog" / "more" / "x.png", seed=5)
    table = extractor.find_images(image_folder)
    assert len(table) == 12
    assert {k: len(v) for k, v in table.skipped.items()} == {"broken link": 1, "link loop": 1,
                                                             "a folder inside a class folder": 1}
    r = _extract(image_folder, tmp_path / "c.h5", r18_weights, layers=["penultimate"])
    assert r.skipped == {"broken link": 1, "link loop": 1, "a folder inside a class folder": 1}
    assert any("1 broken link (e.g. cat/broken.png)" in w for w in r.warnings)


def test_the_output_folder_is_never_scanned_as_data(image_folder, tmp_path, r18_weights, monkeypatch):
    monkeypatch.chdir(image_folder)
    args = ["extract", ".", "--model", "resnet18", "--weights", str(r18_weights), "-q", "--json"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert (image_folder / "cache").is_dir()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and '"state": "up to date"' in again.output, again.output
    inside = [*args, "--out", "c.h5"]  # the cache, its journal and working copy in the data root
    assert CliRunner().invoke(cli, inside).exit_code == 0
    (image_folder / "c.h5.journal").mkdir()  # as an interrupted run leaves it
    again = CliRunner().invoke(cli, inside)
    assert again.exit_code == 0 and '"state": "up to date"' in again.output, again.output


def test_common_names_of_the_validation_split_are_accepted(tmp_path):
    for split in ("train", "validation", "test"):
        for cls in ("a", "b"):
            write_image(tmp_path / "d" / split / cls / "0.png", seed=len(split) + len(cls))
    table = extractor.find_images(tmp_path / "d")
    assert sorted(set(table.splits)) == ["test", "train", "val"]
    assert "validation/a/0.png" in table.paths
    (tmp_path / "e" / "dev" / "a").mkdir(parents=True)
    write_image(tmp_path / "e" / "train" / "a" / "0.png", seed=1)
    write_image(tmp_path / "e" / "dev" / "a" / "0.png", seed=2)
    assert sorted(set(extractor.find_images(tmp_path / "e").splits)) == ["train", "val"]


def _manifest(tmp_path, text: str, encoding="utf-8") -> object:
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name, seed=len(name))
    p = tmp_path / "m.csv"
    p.write_bytes(text.encode(encoding))
    return p


def test_manifests_in_excel_utf8_are_read_and_other_encodings_named(tmp_path):
    p = _manifest(tmp_path, "\ufeffpath,label\na.png,x\nb.png,y\n")
    assert extractor.find_images(p).classes == ["x", "y"]
    p = _manifest(tmp_path, "path,label\na.png,x\nb.png,y\n", encoding="utf-16")
    result = CliRunner().invoke(cli, ["extract", str(p)])
    one_line_error(result, "m.csv is not UTF-8 text", "CSV UTF-8")


def test_a_manifest_leak_between_splits_is_refused_and_duplicates_counted(tmp_path):
    p = _manifest(tmp_path, "path,label,split\na.png,x,train\nb.png,y,train\na.png,x,test\n")
    result = CliRunner().invoke(cli, ["extract", str(p)])
    one_line_error(result, "a.png is listed in train (line 2) and in test", "--allow-overlap")
    table = extractor.find_images(p, allow_overlap=True)
    assert len(table) == 2 and list(table.skipped) == ["a duplicate manifest row"]
    p = _manifest(tmp_path, "path,label\na.png,x\nb.png,\na.png,x\n")
    table = extractor.find_images(p)
    assert {k: len(v) for k, v in table.skipped.items()} == {
        "a duplicate manifest row": 1, "unlabelled rows (extracted; classifiers leave them out)": 1}


def test_strict_on_a_finished_cache_with_failed_rows_fails(image_folder, tmp_path, r18_weights):
    (image_folder / "cat" / "bad.png").write_bytes(b"no image")
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights, layers=["penultimate"])
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "--model", "resnet18",
                                      "--weights", str(r18_weights), "--strict", "-q"])
    one_line_error(result, "cat/bad.png", "stopped by --strict")


def test_absurd_c_grids_are_refused_up_front(tmp_path):
    from .test_house import toy_cache
    cache = toy_cache(tmp_path / "c.h5")
    for grid in ("nan", "inf", "1e-30", "0.1,1e12"):
        result = CliRunner().invoke(cli, ["fit-softmax", "-c", str(cache), "--c-grid", grid])
        assert result.exit_code == 2 and "Invalid value for '--c-grid'" in result.output, \
            (grid, result.output)


def test_a_grid_finer_than_the_map_is_refused(image_folder, tmp_path, r18_weights):
    for pool in ("grid:30", "spp:1,2,50"):
        result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(tmp_path / "c.h5"),
                                          "--model", "resnet18", "--weights", str(r18_weights),
                                          "-l", "layer4",
                                          "--pool", pool])
        one_line_error(result, "'layer4' is a 7x7 map", "use sizes up to 7")
    assert not (tmp_path / "c.h5").exists()


class _Opaque:
    """An object torch's weights_only loader refuses to unpickle."""


def test_weights_files_get_messages_that_help(image_folder, tmp_path):
    import torch
    text = tmp_path / "w.pth"
    text.write_text("hello")
    with_pickle = tmp_path / "p.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": _Opaque()}, with_pickle)
    other = tmp_path / "o.pth"
    torch.save({f"some.very.long.module.name.{i}.weight": torch.zeros(1) for i in range(40)}, other)
    for path, words in ((text, "not a PyTorch file"), (with_pickle, "pickled objects besides tensors"),
                        (other, "does not fit this model")):
        result = CliRunner().invoke(cli, ["extract", str(image_folder), "--model", "resnet18", "--weights",
                                          str(path), "--out", str(tmp_path / "c.h5")])
        line = one_line_error(result, words)
        assert "weights_only=False" not in line
    line = one_line_error(CliRunner().invoke(cli, ["extract", str(image_folder), "--model", "resnet18",
                                                   "--weights", str(other), "--out", str(tmp_path / "c.h5")]))
    assert "40 unexpected keys (some.very.long.module.name.0.weight, some.very.long.module.name.1.weight, " \
           "some.very.long.module.name.2.weight, and 37 more)" in line


def test_predict_checks_its_output_before_the_work_and_refuses_an_empty_folder(image_folder, tmp_path,
                                                                               r18_weights):
    from .test_house import toy_cache
    cache = toy_cache(tmp_path / "c.h5")
    assert CliRunner().invoke(cli, ["fit-svm", "-c", str(cache), "--folds", "2", "--out",
                                    str(tmp_path / "m.joblib")]).exit_code == 0
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["predict", "-m", str(tmp_path / "m.joblib"), str(tmp_path / "empty")])
    one_line_error(result, "no image files in", "nothing to predict")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["predict", "-m", str(tmp_path / "m.joblib"), str(image_folder),
                                      "--out", str(blocker / "p.csv")])
    one_line_error(result, "cannot write to", str(blocker))


def test_class_names_with_dollars_do_not_crash_the_report_and_the_model_is_saved_first(tmp_path):
    from cnncodes.extractor.cache import LayerSpec, create_cache
    from cnncodes.extractor.writer import CacheWriter

    from .test_house import RECIPE
    n = 30
    labels = np.arange(n) % 3
    create_cache(tmp_path / "c.h5", paths=[f"{i}.png" for i in range(n)], labels=labels, splits=[""] * n,
                 classes=["price_$1_to_$2", "$x$", "plain"],
                 layers=[LayerSpec("l1", 4, {"module": "m", "dim": 4})], attrs=RECIPE.to_attrs())
    with CacheWriter(tmp_path / "c.h5") as w:
        X = (np.random.default_rng(0).normal(size=(n, 4)) + labels[:, None] * 3).astype(np.float32)
        w.add(np.arange(n), np.ones(n, np.uint8), [""] * n, {"l1": X})
        w.commit()
    result = CliRunner().invoke(cli, ["fit-svm", "-c", str(tmp_path / "c.h5"), "--folds", "2", "--report",
                                      str(tmp_path / "rep"), "--out", str(tmp_path / "m.joblib")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "confusion.png").stat().st_size > 0 and (tmp_path / "m.joblib").exists()


def test_fit_svm_checks_out_and_report_before_the_fit(tmp_path):
    from .test_house import toy_cache
    cache = toy_cache(tmp_path / "c.h5")
    blocker = tmp_path / "file"
    blocker.write_text("")
    for option in ("--out", "--report"):
        result = CliRunner().invoke(cli, ["fit-svm", "-c", str(cache), option, str(blocker / "x")])
        one_line_error(result, "cannot write to")
        assert "C " not in result.output  # no fit table printed: nothing was fitted


def test_a_damaged_chunk_is_reported_as_damage_by_fit_and_info(tmp_path):
    from .test_house import toy_cache
    cache = toy_cache(tmp_path / "c.h5", n=400, dim=64)
    with h5py.File(cache, "r") as f:
        offset = f["codes/l1"].id.get_chunk_info(0).byte_offset
    with open(cache, "r+b") as fh:
        fh.seek(offset + 10)
        fh.write(b"\xff" * 200)
    result = CliRunner().invoke(cli, ["fit-svm", "-c", str(cache), "--folds", "2"])
    one_line_error(result, f"{cache} is damaged: /codes/l1 cannot be read", "--overwrite")
    assert CliRunner().invoke(cli, ["info", str(cache)]).exit_code == 0  # the summary reads no codes
    one_line_error(CliRunner().invoke(cli, ["info", str(cache), "--check"]), "is damaged: /codes/l1")


def test_a_model_file_with_a_self_made_sidecar_is_refused_in_words(tmp_path):
    import hashlib

    import joblib
    path = tmp_path / "m.joblib"
    joblib.dump({"format": "cnncodes-model", "version": 1}, path)
    (tmp_path / "m.joblib.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  m.joblib\n")
    result = CliRunner().invoke(cli, ["predict", "-m", str(path), str(tmp_path)])
    one_line_error(result, "is not a whole cnncodes model file", "pipeline")


def test_stage_specs_get_messages_that_help():
    import pytest

    from cnncodes.pipelines.finetune.freezing import FinetuneError, parse_stages
    with pytest.raises(FinetuneError, match="is not START:EPOCHS"):
        parse_stages("head:²")


def test_ctrl_c_while_setting_up_exits_130(tmp_path, monkeypatch):
    from cnncodes.extractor import sources

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sources, "find_images", interrupted)
    monkeypatch.setattr("cnncodes.extractor.engine.find_images", interrupted)
    result = CliRunner().invoke(cli, ["extract", str(tmp_path)])
    assert result.exit_code == 130 and "interrupted" in result.output


# --- kill -9 at random points --------------------------------------------------------------------

def _popen(*args):
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-m", "cnncodes", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _kill_at_random_points(args, seed: int, kills: int = 3, spread=(0.3, 4.5)):
    """Run ``cnncodes *args`` and SIGKILL it after a random delay, ``kills`` times (a run that
    finishes first is fine), then run it to the end."""
    import signal
    import time
    rng = np.random.default_rng(seed)
    for _ in range(kills):
        proc = _popen(*args)
        time.sleep(float(rng.uniform(*spread)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
    proc = _popen(*args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_extract_killed_at_random_points_ends_bitwise_equal(tmp_path, r18_weights):
    data = tmp_path / "data"
    for i in range(36):
        write_image(data / f"c{i % 3}" / f"{i:03d}.png", seed=i)
    (data / "c0" / "bad.png").write_bytes(b"broken")
    ref = _extract(data, tmp_path / "ref.h5", r18_weights, batch_size=2)
    out = tmp_path / "killed.h5"
    _kill_at_random_points(["extract", data, "--out", out, "--model", "resnet18", "--weights", r18_weights,
                            "-l", "layer2", "-l", "penultimate", "-b", "2", "-q"], seed=1)
    with h5py.File(ref.path, "r") as a, h5py.File(out, "r") as b:
        for name in ("codes/layer2", "codes/penultimate", "images/status", "images/sha256"):
            assert np.array_equal(a[name][()], b[name][()]), name
        assert b.attrs["complete"]
    assert not out.with_name(out.name + ".journal").exists() and \
        not out.with_name(out.name + ".work").exists()


def test_a_layer_addition_killed_at_random_points_ends_equal(tmp_path, r18_weights):
    data = tmp_path / "data"
    for i in range(36):
        write_image(data / f"c{i % 3}" / f"{i:03d}.png", seed=i)
    out = tmp_path / "c.h5"
    _extract(data, out, r18_weights, layers=["penultimate"], batch_size=2)
    _kill_at_random_points(["extract", data, "--out", out, "--model", "resnet18", "--weights", r18_weights,
                            "-l", "layer2", "-l", "penultimate", "-b", "2", "-q"], seed=2)
    ref = _extract(data, tmp_path / "ref.h5", r18_weights, batch_size=2)
    a, b = _codes(ref.path, "layer2"), _codes(out, "layer2")
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "c.h5.adding.h5").exists()


# --- fine-tuning, compare and sweep --------------------------------------------------------------

TINY = ["--model", "timm:test_efficientnet", "--weights", "none", "-b", "4", "--val-fraction", "0.3",
        "-j", "0", "--patience", "0", "-q"]


def test_finetune_never_replaces_a_folder_that_is_not_this_resumable_run(tmp_path):
    data = write_many(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    args = ["finetune", str(data), "--stages", "head:1", *TINY, "--out", str(run)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    (run / "last.pt").unlink()  # a natural way to save space
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = CliRunner().invoke(cli, [*args, "--lr", "0.1"])
    one_line_error(result, "is not empty", "best.pt", "holds no run to resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing rewritten
    assert CliRunner().invoke(cli, [*args, "--lr", "0.1", "--resume"]).exit_code == 1
    own = tmp_path / "mine"
    own.mkdir()
    (own / "best.pt").write_bytes(b"my own weights")
    one_line_error(CliRunner().invoke(cli, ["finetune", str(data), "--stages", "head:1", *TINY, "--out",
                                            str(own)]),
                   "is not empty")
    assert (own / "best.pt").read_bytes() == b"my own weights"
    assert CliRunner().invoke(cli, [*args, "--lr", "0.1", "--overwrite"]).exit_code == 0


def test_compare_adapts_its_folds_and_a_probe_alone_says_nothing_of_fine_tuning(tmp_path):
    data = write_many(tmp_path / "data", per_class=3)  # 3 training images per class, fewer than 5 folds
    result = CliRunner().invoke(cli, ["compare", str(data), "--strategies", "probe", "--report",
                                      str(tmp_path / "cmp"), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    assert "--folds" not in result.output and "Fine-tuning" not in result.output


def test_sweep_and_compare_name_their_own_options_after_a_cache_mismatch(image_folder, tmp_path, r18_weights):
    cache = tmp_path / "c.h5"
    _extract(image_folder, cache, r18_weights, layers=["penultimate"], pool="max")
    result = CliRunner().invoke(cli, ["sweep", str(image_folder), "--model", "resnet18", "--weights",
                                      str(r18_weights), "--layers", "penultimate", "--cache", str(cache),
                                      "--report", str(tmp_path / "rep"), "-q"])
    line = one_line_error(result, "was made by a different recipe", "Give sweep another --cache")
    assert "--overwrite" not in line and "--out" not in line


def test_a_sweep_killed_at_random_points_ends_with_the_same_table(image_folder, tmp_path, r18_weights):
    import json
    args = ["sweep", image_folder, "--model", "resnet18", "--weights", r18_weights,
            "--layers", "layer2,layer3",
            "--classifier", "svm", "--c-grid", "0.1,1", "--folds", "2", "--cache", tmp_path / "c.h5", "-q"]
    _kill_at_random_points([*args, "--report", tmp_path / "killed"], seed=3, kills=2, spread=(1.0, 6.0))
    _popen(*args, "--report", tmp_path / "whole").communicate(timeout=300)
    a, b = (json.loads((tmp_path / name / "sweep.json").read_text()) for name in ("killed", "whole"))
    keep = ("layer", "classifier", "C", "cv_accuracy", "test_accuracy", "logme")
    assert [{k: r[k] for k in keep} for r in a["rows"]] == [{k: r[k] for k in keep} for r in b["rows"]]


def test_stages_out_of_order_get_the_top_down_order_as_advice(tmp_path):
    data = write_many(tmp_path / "data", per_class=4)
    result = CliRunner().invoke(cli, ["finetune", str(data), "--stages", "all:1,head:1", *TINY,
                                      "--out", str(tmp_path / "run")])
    one_line_error(result, "out of network order", "Unfreeze from the top down: head:1,all:1.")


def test_a_second_writer_is_one_line_and_the_first_one_is_unharmed(image_folder, tmp_path, r18_weights):
    from cnncodes.extractor.writer import CacheWriter
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights, layers=["penultimate"])
    write_image(image_folder / "cat" / "new.png", seed=77)
    with CacheWriter(out):  # another process's session, as far as the lock can tell
        result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "--model",
                                          "resnet18", "--weights", str(r18_weights), "--overwrite", "-q"])
        one_line_error(result, "is being written by another cnncodes process")
    with extractor.open_cache(out) as c:
        assert c.complete and len(c.paths) == 12


def test_compare_names_its_own_options_after_a_cache_mismatch(tmp_path):
    data = write_many(tmp_path / "data", per_class=3)
    report = tmp_path / "cmp"
    extractor.extract(data, report / "codes.h5", model="timm:test_efficientnet", weights="none", pool="max",
                      progress=False)
    result = CliRunner().invoke(cli, ["compare", str(data), "--strategies", "probe", "--report", str(report),
                                      *TINY])
    line = one_line_error(result, "was made by a different recipe", "choose another --report")
    assert "--overwrite" not in line


def test_finetune_killed_at_random_points_ends_bitwise_equal(tmp_path):
    import torch

    from cnncodes.pipelines.finetune.checkpoints import load_checkpoint
    data = write_many(tmp_path / "data", per_class=5)
    args = ["finetune", data, "--stages", "head:1,all:2", *TINY]
    _kill_at_random_points([*args, "--out", tmp_path / "killed", "--resume"], seed=4, kills=2,
                           spread=(2.0, 7.0))
    _popen(*args, "--out", tmp_path / "whole").communicate(timeout=300)
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("killed", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sweep_redoes_the_fits_of_a_cache_whose_images_changed(image_folder, tmp_path, r18_weights):
    import json
    args = ["sweep", str(image_folder), "--model", "resnet18", "--weights", str(r18_weights), "--layers",
            "penultimate", "--classifier", "svm", "--c-grid", "1", "--folds", "2", "--cache",
            str(tmp_path / "c.h5"), "--report", str(tmp_path / "rep"), "-q"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    record = tmp_path / "rep" / "fits" / "resnet18__penultimate__svm.json"
    before = json.loads(record.read_text())["key"]
    write_image(image_folder / "dog" / "1.png", seed=4242)  # other pixels: its codes are made again
    assert CliRunner().invoke(cli, args).exit_code == 0
    after = json.loads(record.read_text())["key"]
    assert after["content"] != before["content"]  # the fit was redone, not read back stale


def test_a_companion_left_by_another_layer_addition_is_not_taken_for_this_one(image_folder, tmp_path,
                                                                            r18_weights):
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights, layers=["penultimate"])
    # an addition of layer2, killed before merging
    _extract(image_folder, tmp_path / "c.h5.adding.h5", r18_weights, layers=["layer2"])
    r = _extract(image_folder, out, r18_weights, layers=["layer3", "penultimate"])
    assert r.state == "layers added" and set(r.layers) == {"penultimate", "layer3"}
    assert not (tmp_path / "c.h5.adding.h5").exists()


def test_hand_made_shards_of_wrong_types_or_layers_are_dropped(image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights)
    with h5py.File(out, "r+") as f:
        f["images/status"][0] = 0
        f.attrs["complete"] = False
    journal = out.with_name(out.name + ".journal")
    journal.mkdir()
    np.savez(journal / "rows-000000000000-000000000000.npz", rows=np.array([0.0]), status=np.array([1]),
             errors=np.array([""]), **{f"codes/{k}": np.zeros((1, d), np.float32)
                                       for k, d in (("layer2", 128), ("penultimate", 512))})
    np.savez(journal / "rows-000000000000-000000000001.npz", rows=np.array([0]), status=np.array([1]),
             errors=np.array([""]), **{"codes/penultimate": np.zeros((1, 512), np.float32)})  # a layer short
    r = _extract(image_folder, out, r18_weights)
    assert r.complete and r.processed == 1 and not any(np.all(v == 0) for v in _codes(out, "layer2").values())


def test_strict_fails_on_a_resumed_cache_with_failed_rows(image_folder, tmp_path, r18_weights):
    (image_folder / "cat" / "bad.png").write_bytes(b"no image")
    out = tmp_path / "c.h5"
    _extract(image_folder, out, r18_weights, layers=["penultimate"])
    st = (image_folder / "dog" / "0.png").stat()
    os.utime(image_folder / "dog" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rerun writes
    write_image(image_folder / "dog" / "0.png", seed=31337)
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "--model", "resnet18",
                                      "--weights", str(r18_weights), "--strict", "-q"])
    one_line_error(result, "cat/bad.png", "stopped by --strict")
