"""``--decode reduced``: images decoded at the smallest scale the resize needs, a recipe key like
the others (resume, content checks and ``auto`` behave as for the runtime)."""
from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cnncodes.extractor.cache import read_attrs
from cnncodes.extractor.decoding import decode_min_size, requested_decode, resolve_decode
from cnncodes.extractor.errors import IncompatibleCacheError, SettingsError
from cnncodes.extractor.images import decode_rgb
from cnncodes.extractor.journal import Journal
from cnncodes.extractor.recipe import Recipe

from cnncodes.pipelines.cli import cli

from cnncodes import extractor

from .conftest import CALTECH, needs_shared


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth photo-like image (a blurred random field): what JPEG and the resize are made for."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BICUBIC)


def _encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


@pytest.mark.parametrize("w,h,scale", [(600, 520, 2), (1100, 1040, 4), (2100, 2060, 8), (4300, 2100, 8)])
def test_a_jpeg_is_decoded_at_the_smallest_dct_scale_that_keeps_the_resize(w, h, scale):
    data = _encoded(_photo(w, h))
    img = decode_rgb(data, "x.jpg", min_size=(256, 256))
    draft = Image.open(io.BytesIO(data))
    draft.draft(None, (256, 256))
    if w // 256 >= 16 and h // 256 >= 16:  # past 1/8, reduce() takes over; not in these cases
        pytest.fail("case out of range")
    assert img.size == ((w + scale - 1) // scale, (h + scale - 1) // scale) == draft.size
    assert min(img.size) >= 256 and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), np.asarray(draft.convert("RGB")))


def test_images_that_cannot_be_reduced_are_the_exact_decode_bitwise():
    for w, h, fmt in [(511, 700, "JPEG"), (300, 300, "JPEG"), (511, 2000, "PNG"), (40, 32, "PNG")]:
        data = _encoded(_photo(w, h), fmt)
        a, b = decode_rgb(data, "x", min_size=(256, 256)), decode_rgb(data, "x")
        assert a.size == b.size == (w, h) and np.array_equal(np.asarray(a), np.asarray(b))


def test_other_formats_are_box_reduced_after_decoding_by_the_largest_integer_factor():
    for fmt in ("PNG", "WEBP", "TIFF"):
        big = _photo(1900, 1300)
        data = _encoded(big, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        img = decode_rgb(data, "x", min_size=(256, 256))
        assert img.size == big.reduce(5).size and min(img.size) >= 256, fmt  # 1300 // 256 = 5
        assert np.array_equal(np.asarray(img), np.asarray(big.reduce(5))), fmt


def test_exif_rotation_is_applied_after_the_reduced_decode():
    img = _photo(2100, 600)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encoded(img, exif=exif.tobytes())
    full, reduced = decode_rgb(data, "x"), decode_rgb(data, "x", min_size=(256, 256))
    assert full.size == (600, 2100) and reduced.size == (300, 1050)  # 1/2: 600 // 256 = 2
    a = np.asarray(full.resize(reduced.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(a - np.asarray(reduced, dtype=np.float32)).mean() < 3  # the same picture, upright


def test_grayscale_cmyk_and_truncated_jpegs_take_the_reduced_path_like_the_exact_one():
    photo = _photo(1200, 900)
    for mode in ("L", "CMYK"):
        img = decode_rgb(_encoded(photo.convert(mode)), "x", min_size=(256, 256))
        assert img.mode == "RGB" and img.size == (600, 450), mode  # 900 // 256 = 3: 1/2
    data = _encoded(photo)
    with pytest.raises(OSError):
        decode_rgb(data[: len(data) // 2], "x", min_size=(256, 256))


def test_decode_names_auto_and_the_former_name():
    assert requested_decode(None) == "auto" and requested_decode("cpu") == "exact"
    assert resolve_decode("auto") == "reduced" and resolve_decode(None, "cpu") == "exact"
    assert resolve_decode("auto", "reduced") == "reduced" and resolve_decode("exact", "reduced") == "exact"
    with pytest.raises(SettingsError, match="decode must be auto or one of reduced, exact, gpu"):
        requested_decode("draft")
    assert decode_min_size("reduced", {"resize": 256, "crop": 224}) == (256, 256)
    assert decode_min_size("exact", {"resize": 256}) is None
    assert Recipe("m", {}, {}, decode="cpu").decode == "exact"
    assert Recipe.from_attrs({"model": "m", "decode": "cpu"}).decode == "exact"


def _big_jpegs(root, n: int):
    """n JPEGs of 2 classes at sizes that take each DCT scale of a 256 px resize."""
    sizes = [(600, 520), (1100, 1030), (2100, 2050), (300, 280)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        path = root / f"c{i % 2}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(w, h, seed=i).save(path, quality=90)
    return root


def _decode_of(cache) -> str:
    return Recipe.from_attrs(read_attrs(cache)).decode


def _extract(data, out, weights, **kw):
    kw.setdefault("layers", ["layer2", "penultimate"])
    kw.setdefault("progress", False)
    return extractor.extract(data, out, model="resnet18", weights=str(weights), **kw)


def test_new_caches_are_reduced_and_auto_keeps_an_existing_caches_decode(tmp_path, r18_weights):
    data = _big_jpegs(tmp_path / "data", 8)
    new = _extract(data, tmp_path / "new.h5", r18_weights)
    old = _extract(data, tmp_path / "old.h5", r18_weights, decode="cpu")  # the former name of exact
    assert _decode_of(new.path) == "reduced" and _decode_of(old.path) == "exact"
    with extractor.open_cache(new.path) as a, extractor.open_cache(old.path) as b:
        x, y, paths = a.codes("penultimate"), b.codes("penultimate"), a.paths
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.98 and not np.array_equal(x[0], y[0])  # close, and really another path
    small = paths.index("c1/003.jpg")  # 300 x 280: nothing to reduce, bitwise the exact path
    assert np.array_equal(x[small], y[small])
    assert _extract(data, old.path, r18_weights).state == "up to date"  # auto kept `exact`
    assert _extract(data, old.path, r18_weights, layers=["layer3"]).state == "layers added"
    with pytest.raises(IncompatibleCacheError, match="decode: 'exact' in the cache, 'reduced' requested"):
        _extract(data, old.path, r18_weights, decode="reduced")


def test_a_reduced_run_killed_midway_resumes_to_the_identical_result(tmp_path, r18_weights):
    data = _big_jpegs(tmp_path / "data", 40)
    ref = _extract(data, tmp_path / "ref.h5", r18_weights, batch_size=2)
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "cnncodes", "extract", str(data), "--out", str(out),
                             "--model", "resnet18", "--weights", str(r18_weights), "-l", "layer2",
                             "-l", "penultimate", "-b", "2", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(Journal(out).shards()) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120, "no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    r = _extract(data, out, r18_weights, batch_size=2)
    assert r.state == "resumed" and r.complete and 0 < r.processed < 40
    with h5py.File(ref.path, "r") as a, h5py.File(out, "r") as b:
        assert b.attrs["decode"] == "reduced"
        for name in ("codes/layer2", "codes/penultimate", "images/status", "images/sha256"):
            assert np.array_equal(a[name][()], b[name][()]), name  # bitwise


def test_a_changed_file_is_found_by_content_on_the_reduced_path_too(tmp_path, r18_weights):
    data = _big_jpegs(tmp_path / "data", 4)
    out = _extract(data, tmp_path / "c.h5", r18_weights).path
    victim = data / "c1" / "001.jpg"
    _photo(1100, 1030, seed=99).save(victim, quality=90)
    r = _extract(data, out, r18_weights)
    assert r.processed == 1  # that image alone, decoded again the cache's way
    ref = _extract(data, tmp_path / "ref.h5", r18_weights)
    with extractor.open_cache(out) as a, extractor.open_cache(ref.path) as b:
        assert np.array_equal(a.codes("penultimate"), b.codes("penultimate"))


def test_the_command_line_takes_auto_reduced_exact_and_cpu(tmp_path, r18_weights):
    data = _big_jpegs(tmp_path / "data", 4)
    run = CliRunner().invoke
    base = ["extract", str(data), "--model", "resnet18", "--weights", str(r18_weights), "-q", "--json"]
    r = run(cli, [*base, "--out", str(tmp_path / "a.h5"), "--decode", "cpu"])
    assert r.exit_code == 0, r.output
    assert _decode_of(tmp_path / "a.h5") == "exact"
    r = run(cli, [*base, "--out", str(tmp_path / "a.h5"), "--decode", "reduced"])
    assert r.exit_code == 1 and "decode: 'exact' in the cache, 'reduced' requested" in r.output
    assert "Traceback" not in r.output
    r = run(cli, [*base, "--out", str(tmp_path / "a.h5"), "--decode", "draft"])
    assert r.exit_code == 2 and "'draft' is not one of" in r.output


def test_predict_decodes_new_images_as_the_training_images_were(tmp_path, r18_weights):
    from cnncodes.pipelines.probes.artifacts import load_model, save_model
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    from cnncodes.pipelines.probes.predict import predict_images
    data = _big_jpegs(tmp_path / "data", 12)
    for decode in ("reduced", "exact"):
        path = _extract(data, tmp_path / f"{decode}.h5", r18_weights, layers=["penultimate"],
                        decode=decode).path
        model = load_model(save_model(fit_linear_probe(path, "penultimate", "softmax", c_grid="1", folds=2),
                                      tmp_path / f"{decode}.joblib"))
        with extractor.open_cache(path) as c:
            codes, paths = c.codes("penultimate"), [str((data / p).resolve()) for p in c.paths]
        want = dict(zip(paths, model.pipeline.predict_proba(codes).max(1)))
        got = {p.path: p.score for p in predict_images(model, [data])}
        assert got.keys() == want.keys()
        assert max(abs(got[k] - want[k]) for k in want) < 1e-5, decode  # the same pixels, the same codes


@pytest.mark.slow
@needs_shared
def test_reduced_codes_of_phone_size_photos_stay_close_to_the_exact_ones(tmp_path):
    """Caltech photos enlarged to phone sizes (each DCT scale), Lite0's real weights: the
    reduced decode's codes against the full decode's."""
    files = sorted((CALTECH / "test").rglob("*.jpg"))[::25][:20]
    root = tmp_path / "big"
    for i, f in enumerate(files):
        w, h = Image.open(f).size
        side = (600, 1200, 3024)[i % 3]
        size = (side * w // min(w, h), side * h // min(w, h))
        path = root / f.parent.name / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    from cnncodes.extractor.backbones.loading import load_backbone
    from cnncodes.extractor.encoding import encode_images
    bb = load_backbone()
    paths = sorted(root.rglob("*.jpg"))
    torch.manual_seed(0)
    a, _ = encode_images(bb, paths, ["stage4", "penultimate"], decode="exact")
    b, _ = encode_images(bb, paths, ["stage4", "penultimate"], decode="reduced")
    for layer in a:
        x, y = a[layer], b[layer]
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.mean() >= 0.995 and cos.min() >= 0.98, (layer, cos.mean(), cos.min())


def test_auto_never_resumes_a_gpu_cache_on_a_cpu(tmp_path, r18_weights):
    data = _big_jpegs(tmp_path / "data", 4)
    out = _extract(data, tmp_path / "c.h5", r18_weights, decode="exact").path
    with h5py.File(out, "r+") as f:  # as a run on CUDA with --decode gpu leaves it
        f.attrs["decode"] = "gpu"
    with pytest.raises(SettingsError, match="was made with --decode gpu .* this run is on cpu"):
        _extract(data, out, r18_weights, layers=["layer3"])
