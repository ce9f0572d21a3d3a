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

from cnncodes import extractor
from cnncodes.pipelines.cli import cli

from .conftest import write_image

LAYERS = ["layer2", "penultimate"]


def _extract(data, out, weights, **kw):
    kw.setdefault("layers", LAYERS)
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    return extractor.extract(data, out, model="resnet18", weights=str(weights), **kw)


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
    return subprocess.run([sys.executable, "-m", "cnncodes", "extract", str(data), "--out", str(out), "--model",
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
        assert lines[0].startswith("Error: no space left on the device of") and "rerun the same command" in lines[0]
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

    from cnncodes.extractor import cache as cache_module
    real = cache_module.Journal.write
    calls = []

    def full(self, *a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)
    monkeypatch.setattr(cache_module.Journal, "write", full)
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "--model", "resnet18",
                                      "--weights", str(r18_weights), "-b", "2", "-q", "-l", "layer2", "-l", "penultimate"])
    one_line_error(result, "no space left on the device of", "images are saved", "free space and rerun")
    monkeypatch.setattr(cache_module.Journal, "write", real)
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
            if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True).returncode:
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
