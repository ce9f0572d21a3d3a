"""``--decode gpu``: its code runs here on the CPU (torchvision's libjpeg decoder stands in for
nvJPEG), with the per-image fallbacks to the exact Pillow path; the CUDA run is ``gpu``-marked."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cnncodes.extractor import load_backbone
from cnncodes.extractor.batching import collate, encoded_batches, row_blocks
from cnncodes.extractor.device_decode import DeviceDecoder, check_decode
from cnncodes.extractor.encoding import PreparedNetwork, make_encoder
from cnncodes.extractor.errors import SettingsError
from cnncodes.extractor.layers import Probe
from cnncodes.extractor.pooling import parse_pooling
from cnncodes.extractor.recipe import Recipe
from cnncodes.extractor.sources import find_images

from cnncodes.pipelines.cli import cli

from .conftest import CALTECH, needs_shared, write_image


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.fixture
def odd_images(tmp_path):
    """A folder of JPEGs of every kind the device decoder meets, a PNG and a broken file."""
    root = tmp_path / "odd" / "x"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), np.ones((20, 20, 1), np.uint8))
    Image.fromarray(smooth).save(root / "a_rgb.jpg", quality=92)
    Image.fromarray(smooth).convert("L").save(root / "b_gray.jpg")
    Image.fromarray(smooth).convert("CMYK").save(root / "c_cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the upright image is 240 wide, 320 high
    Image.fromarray(smooth).save(root / "d_exif.jpg", exif=exif)
    write_image(root / "e.png", seed=3, size=(300, 200))
    (root / "f_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    return root.parent


def _exact(split, table, i):
    return split.pil(table.load(i))


def test_device_decoder_on_the_cpu_matches_the_exact_path_closely(lite0, odd_images):
    table = find_images(odd_images)
    split = lite0.split
    decoder = DeviceDecoder(split, "cpu", table.paths)
    from cnncodes.extractor.batching import EncodedImages
    rows, datas, errs, content = collate([EncodedImages(table)[i] for i in range(len(table))])
    rows, x, errs, _ = decoder(rows, datas, errs, content)
    names = [p.split("/")[-1] for p in table.paths]
    assert [bool(e) for e in errs] == [n == "f_broken.jpg" for n in names]
    assert errs[names.index("f_broken.jpg")].startswith("OSError")  # Pillow's word, as on the exact path
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 224, 224)
    good = [i for i in range(len(names)) if not errs[i]]
    for k, i in enumerate(good):
        want = _exact(split, table, i).int()
        diff = (x[k].int() - want).abs().float()
        if names[i] == "e.png":  # not a JPEG: the exact path itself
            assert diff.max() == 0
        else:  # the same libjpeg decode, another resampling arithmetic; the right orientation
            assert diff.mean() < 3 and diff.max() < 64, (names[i], diff.mean(), diff.max())


@needs_shared
@pytest.mark.slow
def test_codes_of_the_device_path_are_close_to_the_exact_codes(lite0, tmp_path):
    files = sorted(CALTECH.glob("train/*/*"))[:16]
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    table = find_images(csv)
    probe = Probe(lite0.model, lite0.input_size, lite0.name)
    taps = probe.resolve(["stage3", "penultimate"])
    pooling = parse_pooling("avg")
    dims = {"stage3": 40, "penultimate": 1280}
    net = PreparedNetwork(lite0, taps, pooling, torch.device("cpu"))
    out = {}
    for decode in ("cpu", "gpu"):
        enc, ds = make_encoder(lite0, probe, taps, pooling, torch.device("cpu"), "fp32", 8, dims, "float32",
                               table, net, decode)
        with enc:
            batches = list(encoded_batches(enc, ds, row_blocks(np.arange(len(table)), 8),
                                           torch.device("cpu"), None))
        out[decode] = {k: np.concatenate([b[3][k] for b in batches]) for k in dims}
    for k in dims:
        a, b = out["cpu"][k], out["gpu"][k]
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert 0 < rel < 0.2, (k, rel)  # close, not bitwise
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.97, (k, cos.min())


def test_decode_gpu_is_refused_where_it_cannot_run(lite0, image_folder, tmp_path):
    with pytest.raises(SettingsError, match="CUDA device"):
        check_decode("gpu", torch.device("cpu"), lite0.split, lite0.name)
    with pytest.raises(SettingsError, match="decode must be"):
        check_decode("nvjpeg", torch.device("cpu"), lite0.split, lite0.name)
    assert check_decode("cpu", torch.device("cpu"), None, "x") == "exact"  # its former name
    r = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(tmp_path / "c.h5"),
                                 "--decode", "gpu"])
    assert r.exit_code == 1 and "--decode gpu" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "c.h5").exists()
    # the decode path is part of the recipe: a cache of one is never resumed by the other
    a = Recipe("m", {}, {}, decode="gpu")
    assert any("decode" in d for d in a.differences(Recipe("m", {}, {})))
    assert Recipe.from_attrs({"model": "m"}).decode == "exact"  # caches made before --decode


def test_cpu_lanes_are_capped_by_memory():
    from cnncodes.extractor.batching import LANES_MEMORY, cpu_lanes
    assert cpu_lanes(2, 80 << 20) == (2, 1)
    lanes, threads = cpu_lanes(64, 200 << 20)
    assert lanes * (200 << 20) <= LANES_MEMORY and lanes * threads <= 64 and threads >= 2


@pytest.mark.gpu
@needs_shared
def test_nvjpeg_codes_on_cuda(tmp_path):
    from cnncodes import extractor
    files = sorted(CALTECH.glob("train/*/*"))[:64]
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    a = extractor.extract(csv, tmp_path / "cpu.h5", device="cuda", precision="fp32", decode="cpu")
    b = extractor.extract(csv, tmp_path / "gpu.h5", device="cuda", precision="fp32", decode="gpu")
    assert a.done == b.done == 64
    with extractor.open_cache(a.path) as ca, extractor.open_cache(b.path) as cb:
        x, y = ca.codes("penultimate"), cb.codes("penultimate")
    assert np.abs(x - y).max() / np.abs(x).max() < 0.2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_the_device_is_pillows(orientation):
    from PIL import ImageOps

    from cnncodes.extractor.device_decode import exif_orient
    a = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    img._exif = exif
    want = np.asarray(ImageOps.exif_transpose(img))
    got = exif_orient(torch.from_numpy(a).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape and (got == want).all()
