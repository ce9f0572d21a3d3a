import json

import h5py
import numpy as np
import pytest

from cnncodes.extractor.cache import DONE, FAILED, LayerSpec, create_cache, open_cache, read_attrs
from cnncodes.extractor.errors import CacheError, CacheLockedError
from cnncodes.extractor.journal import Journal
from cnncodes.extractor.recipe import Recipe
from cnncodes.extractor.writer import CacheWriter


def _make(path, n=5, dim=3):
    create_cache(path, paths=[f"c/{i}.png" for i in range(n)], labels=np.arange(n) % 2,
                 splits=["train"] * n, classes=["a", "b"],
                 layers=[LayerSpec("l1", dim, {"module": "m.1", "stride": 8})],
                 attrs={"model": "toy", "weights": {"name": "none"}, "weights_sha256": "none",
                        "preprocessing": {"crop": 32}, "pooling": "avg", "dtype": "float32",
                        "precision": "fp32", "image_fingerprint": "abc"})


def test_plain_h5py_reads_the_layout(tmp_path):
    p = tmp_path / "c.h5"
    _make(p)
    with h5py.File(p, "r") as f:
        assert f.attrs["format"] == "cnncodes-cache" and f.attrs["complete"] == False  # noqa: E712
        assert json.loads(f.attrs["preprocessing"]) == {"crop": 32}
        assert f["images/path"][0].decode() == "c/0.png" and f["images/label"][1] == 1
        assert h5py.check_enum_dtype(f["images/status"].dtype) == {"pending": 0, "done": 1, "failed": 2}
        ds = f["codes/l1"]
        assert ds.shape == (5, 3) and ds.maxshape == (None, 3) and ds.compression == "gzip"
        assert ds.chunks is not None and ds.attrs["module"] == "m.1"


def test_writer_commit_replaces_atomically_and_marks_complete(tmp_path):
    p = tmp_path / "c.h5"
    _make(p)
    with CacheWriter(p) as w:
        assert w.pending_rows().tolist() == [0, 1, 2, 3, 4]
        w.add([0, 1, 2], [DONE, FAILED, DONE], ["", "OSError: bad", ""], {"l1": np.ones((3, 3), np.float32)})
        assert not read_attrs(p)["complete"]  # nothing reaches the cache before commit
        w.add([3, 4], [DONE, DONE], ["", ""], {"l1": np.full((2, 3), 2, np.float32)})
        assert w.commit()
    assert not Journal(p).dir.exists() and not (tmp_path / "c.h5.work").exists()
    with open_cache(p) as c:
        assert c.complete and c.status.tolist() == [1, 2, 1, 1, 1]
        assert c.errors[1] == "OSError: bad" and c.codes("l1")[4].tolist() == [2, 2, 2]
        s = c.summary()
        assert (s["done"], s["failed"], s["pending"]) == (4, 1, 0)
        with pytest.raises(CacheError, match="holds: l1"):
            c.codes("l9")


def test_shards_of_a_killed_session_are_replayed(tmp_path):
    p = tmp_path / "c.h5"
    _make(p)
    w = CacheWriter(p).__enter__()
    w.add([0, 1], [DONE, DONE], ["", ""], {"l1": np.ones((2, 3), np.float32)})
    # simulate kill -9: no commit, no close; the lock dies with the process (released here)
    w._f.close()
    w._f = None
    import fcntl
    import os
    fcntl.flock(w._lock_fd, fcntl.LOCK_UN)
    os.close(w._lock_fd)
    w._lock_fd = None
    with open_cache(p) as c:
        assert c.summary()["unmerged_rows"] == 2 and c.status.tolist() == [0] * 5
    with CacheWriter(p) as w2:
        assert w2.pending_rows().tolist() == [2, 3, 4]
        w2.commit()
    with open_cache(p) as c:
        assert c.status.tolist() == [1, 1, 0, 0, 0] and not c.complete


def test_an_unreadable_shard_is_dropped_and_its_rows_redone(tmp_path, caplog):
    p = tmp_path / "c.h5"
    _make(p)
    with CacheWriter(p) as w:
        w.add([0, 1], [DONE, DONE], ["", ""], {"l1": np.ones((2, 3), np.float32)})
        # a damaged shard beside the good one, as a disk fault could leave
        (Journal(p).dir / "rows-000000000002-000000000003.npz").write_bytes(b"not a zip")
        w._f.close()  # like a kill: shards stay, nothing committed
        w._f = None
        w._ds.clear()
        w._lock_fd, fd = None, w._lock_fd
        import fcntl
        import os
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    with CacheWriter(p) as w2:
        assert w2.pending_rows().tolist() == [2, 3, 4]
        assert "unreadable journal shard" in caplog.text
        w2.commit()
    with open_cache(p) as c:
        assert c.status.tolist() == [1, 1, 0, 0, 0]


def test_second_writer_gets_a_clear_error(tmp_path):
    p = tmp_path / "c.h5"
    _make(p)
    with CacheWriter(p):
        with pytest.raises(CacheLockedError, match="being written by another cnncodes process"):
            CacheWriter(p).__enter__()


def test_foreign_and_newer_files_are_refused(tmp_path):
    (tmp_path / "t.h5").write_text("text")
    with pytest.raises(CacheError, match="not an HDF5 file"):
        read_attrs(tmp_path / "t.h5")
    with h5py.File(tmp_path / "o.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(CacheError, match="not a cnncodes cache"):
        read_attrs(tmp_path / "o.h5")
    _make(tmp_path / "n.h5")
    with h5py.File(tmp_path / "n.h5", "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="newer than"):
        read_attrs(tmp_path / "n.h5")


def test_recipe_differences_are_named():
    a = {"model": "resnet18", "pooling": "avg", "image_fingerprint": "x", "weights_sha256": "1",
         "weights": {"name": "a.pt"}}
    b = dict(a, pooling="max", image_fingerprint="y")
    d = Recipe.from_attrs(a).differences(Recipe.from_attrs(b))
    assert "pooling: 'avg' in the cache, 'max' requested" in d and any("image list" in x for x in d)
