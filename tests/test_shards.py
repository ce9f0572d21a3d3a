"""WebDataset tar shards as input: made here from the Caltech photos, read in place."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cnncodes.extractor.errors import ImageSourceError
from cnncodes.extractor.sources import find_images

from cnncodes.pipelines.cli import cli

from cnncodes import extractor

from .conftest import CALTECH, needs_shared, write_image


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tf.addfile(info, io.BytesIO(data))


def write_shards(files, folder: Path, prefix: str = "train", per_shard: int = 10,
                 label: str = "txt") -> list[Path]:
    """WebDataset shards of ``files`` (key = class_stem), each with a label member."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(0, len(files), per_shard):
        path = folder / f"{prefix}-{k // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for f in files[k:k + per_shard]:
                key = f"{f.parent.name}_{f.stem}"
                add_member(tf, key + f.suffix.lower(), f.read_bytes())
                if label == "txt":
                    add_member(tf, key + ".txt", f.parent.name.encode())
                elif label == "json":
                    add_member(tf, key + ".json", json.dumps({"label": f.parent.name, "w": 1}).encode())
        out.append(path)
    return out


def _codes(path: Path, name: str = "penultimate"):
    with extractor.open_cache(path) as c:
        return c.codes(name), list(c.paths), c.labels, list(c.splits), list(c.classes), c.status


@needs_shared
@pytest.mark.slow
def test_shards_give_the_codes_of_the_files_they_hold(tmp_path):
    train = sorted(CALTECH.glob("train/*/*"))[:24]
    test = sorted(CALTECH.glob("test/*/*"))[:6]
    write_shards(train, tmp_path / "shards", "train", per_shard=10)
    write_shards(test, tmp_path / "shards", "test", per_shard=10, label="json")
    csv = tmp_path / "same.csv"
    csv.write_text("path,label,split\n" + "".join(f"{p},{p.parent.name},{s}\n" for s, fs in
                                                  (("train", train), ("test", test)) for p in fs))
    a = extractor.extract(tmp_path / "shards", tmp_path / "shards.h5", batch_size=8, runtime="torch")
    b = extractor.extract(csv, tmp_path / "files.h5", batch_size=8, runtime="torch")
    assert a.done == b.done == 30
    X, paths, y, splits, classes, _ = _codes(tmp_path / "shards.h5")
    X2, paths2, y2, splits2, classes2, _ = _codes(tmp_path / "files.h5")
    key = {f"{Path(p).parent.name}_{Path(p).stem}": i for i, p in enumerate(paths2)}
    order = [key[p.split("/", 1)[1]] for p in paths]
    assert np.array_equal(X, X2[order])  # the same bytes, the same decoding: bitwise
    assert paths[0] == "test-000000.tar/" + test[0].parent.name + "_" + test[0].stem
    assert classes == classes2 and [classes[i] for i in y] == [classes2[i] for i in y2[order]]
    assert splits == [splits2[i] for i in order] and set(splits) == {"train", "test"}
    # worker processes read members in place too
    c = extractor.extract(tmp_path / "shards", tmp_path / "workers.h5", batch_size=8, workers=2,
                          runtime="torch")
    assert c.done == 30 and np.allclose(_codes(tmp_path / "workers.h5")[0], X, rtol=1e-4, atol=1e-5)
    # a brace pattern picks shards; the default cache is named after their folder
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    t = find_images(pattern)
    assert len(t) == 20 and t.paths[0].startswith("train-000000.tar/")


def test_shard_members_labels_and_damage(tmp_path):
    imgs = [write_image(tmp_path / "src" / f"{i}.png", seed=i) for i in range(6)]
    shard = tmp_path / "data" / "val-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        add_member(tf, "dir.v1/a.png", imgs[0].read_bytes())
        add_member(tf, "dir.v1/a.cls", b"7")
        add_member(tf, "b.png", imgs[1].read_bytes())
        add_member(tf, "b.cls", b"3")
        add_member(tf, "b.txt", b"cat")          # a name wins over an index
        add_member(tf, "c.jpg", b"\xff\xd8 broken")  # a corrupt member: a failed row
        add_member(tf, "c.cls", b"3")
        add_member(tf, "d.json", b'{"label": 7}')  # no image: skipped, recorded
        add_member(tf, "e.png", imgs[2].read_bytes())  # unlabelled
        add_member(tf, "f.png", imgs[3].read_bytes())
        add_member(tf, "f.cls", b"not a number")
    t = find_images(tmp_path / "data")
    assert t.paths == ["val-000000.tar/dir.v1/a", "val-000000.tar/b", "val-000000.tar/c",
                       "val-000000.tar/e", "val-000000.tar/f"]
    assert t.classes == ["3", "7", "cat"]
    assert [t.classes[i] if i >= 0 else None for i in t.labels] == ["7", "cat", "3", None, None]
    assert set(t.splits) == {"val"}
    assert "a sample with no image member" in t.skipped
    assert "a label member that holds no class" in t.skipped
    out = tmp_path / "c.h5"
    r = extractor.extract(tmp_path / "data", out, model="timm:test_resnet", weights="none", runtime="torch")
    assert r.done == 4 and r.failed == 1 and r.failures[0][0] == "val-000000.tar/c"
    assert extractor.extract(tmp_path / "data", out, model="timm:test_resnet", weights="none",
                             runtime="torch").state == "up to date"

    # rewriting a shard with one member changed re-extracts that member alone
    with h5py.File(out, "r") as f:
        before = f["codes/penultimate"][()]
    members = []
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            members.append((m.name, tf.extractfile(m).read()))
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            add_member(tf, name, imgs[4].read_bytes() if name == "e.png" else data)
    r = extractor.extract(tmp_path / "data", out, model="timm:test_resnet", weights="none", runtime="torch")
    assert r.state == "resumed" and r.processed == 1
    with h5py.File(out, "r") as f:
        after = f["codes/penultimate"][()]
    assert np.array_equal(before[[0, 1, 4]], after[[0, 1, 4]]) and not np.array_equal(before[3], after[3])

    # a truncated shard keeps the samples before the damage, and says so
    data = shard.read_bytes()
    cut = tmp_path / "cut" / "shard.tar"
    cut.parent.mkdir()
    for at in (len(data) // 2 + 100, len(data) // 3, 1600):  # inside members and headers
        cut.write_bytes(data[:at])
        t = find_images(cut.parent)
        assert 0 < len(t) < 5 and any("truncated" in k or "damaged" in k for k in t.skipped), at


def test_shard_sources_refused_with_one_line(tmp_path):
    with pytest.raises(ImageSourceError, match="does not exist"):
        find_images(str(tmp_path / "shards-{000..003}.tar"))
    (tmp_path / "z").mkdir()
    with tarfile.open(tmp_path / "z" / "a.tar.gz", "w:gz") as tf:
        add_member(tf, "x.png", b"")
    with pytest.raises(ImageSourceError, match="compressed"):
        find_images(tmp_path / "z")
    (tmp_path / "e").mkdir()
    with tarfile.open(tmp_path / "e" / "a.tar", "w") as tf:
        add_member(tf, "x.cls", b"1")
    r = CliRunner().invoke(cli, ["extract", str(tmp_path / "e"), "--out", str(tmp_path / "e.h5")])
    assert r.exit_code == 1 and "no images found in the shards" in r.output and "Traceback" not in r.output
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "a.tar").write_bytes(b"garbage" * 100)
    (tmp_path / "n" / "b.tar").write_bytes(b"")
    with pytest.raises(ImageSourceError, match="2 an unreadable tar shard"):
        find_images(tmp_path / "n")
    # one unreadable shard among good ones is passed over and counted, as a broken link is
    with tarfile.open(tmp_path / "n" / "c.tar", "w") as tf:
        add_member(tf, "x.png", write_image(tmp_path / "x.png", seed=1).read_bytes())
    t = find_images(tmp_path / "n")
    assert t.paths == ["c.tar/x"] and len(t.skipped["an unreadable tar shard"]) == 2


def test_shard_sources_of_every_shape(tmp_path):
    from cnncodes.extractor.engine import default_cache_path
    png = write_image(tmp_path / "x.png", seed=2).read_bytes()

    def shard(path: Path, members):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tf:
            for name, data in members:
                add_member(tf, name, data)
            link = tarfile.TarInfo("link.png")
            link.type, link.linkname = tarfile.SYMTYPE, "a.png"
            tf.addfile(link)
        return path

    # .cls indices are the labels themselves (a test set lacking classes agrees with its train set)
    bom = b"\xef\xbb\xbf"
    shard(tmp_path / "d" / "train" / "0.tar", [("./a.png", png), ("a.cls", b"5"), ("/b.png", png),
                                                ("b.cls", b"-3"), ("c.png", png), ("c.txt", bom + b"cat")])
    shard(tmp_path / "d" / "val" / "0.tar", [("e.png", png), ("e.cls", b"2")])
    t = find_images(tmp_path / "d")  # shards in split folders
    assert t.paths == ["train/0.tar/a", "train/0.tar/b", "train/0.tar/c", "val/0.tar/e"]
    assert t.splits == ["train", "train", "train", "val"]
    assert [t.classes[i] if i >= 0 else None for i in t.labels] == ["5", None, "cat", "2"]
    assert "a tar member that is no regular file (a link, a device)" in t.skipped
    only_index = find_images(tmp_path / "d" / "val")
    assert only_index.classes == ["0", "1", "2"] and only_index.labels.tolist() == [2]
    # a shard named twice is read once; a pattern's default cache is named after it
    pattern = str(tmp_path / "d" / "train" / "{0,0}.tar")
    t = find_images(pattern)
    assert len(t) == 3 and "a shard named twice (read once)" in t.skipped
    assert default_cache_path(pattern, "m").name == "train-0-0-m.h5"
    assert default_cache_path(tmp_path / "d", "m").name == "d-m.h5"
    # gzip data named .tar, and wildcards, are refused with a hint
    (tmp_path / "g").mkdir()
    with tarfile.open(tmp_path / "g" / "a.tar", "w:gz") as tf:
        add_member(tf, "x.png", png)
    with pytest.raises(ImageSourceError, match="compressed"):
        find_images(tmp_path / "g")
    with pytest.raises(ImageSourceError, match="wildcards"):
        find_images(tmp_path / "d" / "train" / "*.tar")


def test_strict_stops_on_a_shard_it_cannot_read(tmp_path):
    png = write_image(tmp_path / "x.png", seed=2).read_bytes()
    (tmp_path / "s").mkdir()
    with tarfile.open(tmp_path / "s" / "a.tar", "w") as tf:
        add_member(tf, "a.png", png)
    (tmp_path / "s" / "b.tar").write_bytes(b"")
    kw = dict(model="timm:test_resnet", weights="none", runtime="torch")
    with pytest.raises(extractor.ImageDecodeError, match="unreadable tar shard"):
        extractor.extract(tmp_path / "s", tmp_path / "c.h5", strict=True, **kw)
    r = extractor.extract(tmp_path / "s", tmp_path / "c.h5", **kw)
    assert r.done == 1 and r.skipped["an unreadable tar shard"] == 1
