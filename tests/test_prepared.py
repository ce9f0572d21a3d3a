"""Images decoded once (``finetune --prepare``): copies made once and read back, bitwise where
they replace the evaluation transform, made again when a file changes or a copy is damaged,
shared between runs, and a run with them reproducible (same seed, same weights)."""
from __future__ import annotations

import logging
import os
import shutil
from types import SimpleNamespace

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from cnncodes.extractor import load_backbone
from cnncodes.extractor.sources import find_images

from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.finetune.checkpoints import load_checkpoint
from cnncodes.pipelines.finetune.data import training_side
from cnncodes.pipelines.finetune.prepared import EvalCopy, PreparedImages, TrainCopy, make_stores
from cnncodes.pipelines.finetune.training import finetune

from .conftest import write_image
from .test_finetune import TINY, tiny_config


def write_photos(root, per_class: int = 6, size=(300, 280)):
    """Images larger than the tiny model's training side (271 px for `light` crops of 160), and
    one small image that needs no copy."""
    for c, cls in enumerate("abc"):
        for i in range(per_class):
            write_image(root / "train" / cls / f"{i}.jpg", seed=100 * c + i, size=size)
        write_image(root / "test" / cls / "0.jpg", seed=900 + c, size=size)
    write_image(root / "train" / "a" / "small.png", seed=7, size=(60, 50))
    return root


def copies(folder, kind: str) -> list:
    return sorted(p for d in folder.glob(f"{kind}-*") for p in d.glob("*.npy"))


def test_copies_are_made_once_shared_by_runs_and_give_the_same_weights(tmp_path, caplog):
    data = write_photos(tmp_path / "data")
    prep = tmp_path / "prep"
    cfg = dict(stages="head:1,all:1", prepared_dir=str(prep))
    with caplog.at_level(logging.INFO, logger="cnncodes.pipelines.finetune.prepared"):
        first = finetune(tiny_config(data, tmp_path / "one", **cfg), progress=False)
    assert first.recipe["prepare"] is True
    # the large training photos have training copies, the held-out and test ones evaluation
    # copies; small.png is read from its file
    n_train, n_eval = len(copies(prep, "train")), len(copies(prep, "eval"))
    assert n_train >= 10 and n_eval >= 3 and n_train + n_eval <= 21
    side = training_side(load_backbone(TINY, "none").preprocessing, "light")
    assert side == 271 and all(min(np.load(p).shape[:2]) == side for p in copies(prep, "train"))
    assert all(np.load(p).shape == (3, 160, 160) for p in copies(prep, "eval"))
    assert f"({n_train} made now)" in caplog.text and f"({n_eval} made now)" in caplog.text
    stamps = {p: p.stat().st_mtime_ns for p in copies(prep, "train") + copies(prep, "eval")}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cnncodes.pipelines.finetune.prepared"):
        second = finetune(tiny_config(data, tmp_path / "two", **cfg), progress=False)
    assert "(0 made now)" in caplog.text and "made now" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    assert second.test_accuracy == first.test_accuracy

    # without the store: a different recipe, the same data
    off = finetune(tiny_config(data, tmp_path / "off", prepare=False, **cfg), progress=False)
    assert off.recipe["prepare"] is False and off.status == "trained"


def _store(tmp_path, data, kind: str):
    bb = load_backbone(TINY, "none")
    table = find_images(data)
    if kind == "eval":
        make = EvalCopy((168, 168), bb.split)
        return table, bb, PreparedImages(tmp_path / "prep", table, "eval", "reduced", 168, make, {"p": 1},
                                         finish=make.finish)
    make = TrainCopy((271, 271), 271, Image.Resampling.BICUBIC)
    return table, bb, PreparedImages(tmp_path / "prep", table, "train", "reduced", 271, make, {"p": 1})


def test_an_evaluation_copy_is_bitwise_what_the_transform_makes_of_the_file(tmp_path):
    data = write_photos(tmp_path / "data", per_class=2, size=(700, 500))
    table, bb, store = _store(tmp_path, data, "eval")
    rows = np.arange(len(table))
    shas = store.prepare(rows)
    small = table.paths.index("train/a/small.png")
    assert small not in shas and len(shas) == len(table) - 1
    for row in shas:
        want = bb.split(table.load(row, min_size=(168, 168)))
        assert torch.equal(store.load(row), want), table.paths[row]


def test_changed_files_and_damaged_copies_are_made_again(tmp_path):
    data = write_photos(tmp_path / "data", per_class=2)
    table, _, store = _store(tmp_path, data, "train")
    rows = np.arange(len(table))
    shas = dict(store.prepare(rows))
    row = table.paths.index("train/b/1.jpg")
    first = np.asarray(store.load(row))
    assert first.shape == (271, 290, 3)

    # a damaged copy (cut short) is made again from its file: the same pixels
    path = store._copy_path(shas[row])
    path.write_bytes(path.read_bytes()[:500])
    assert np.array_equal(np.asarray(store.load(row)), first)
    assert np.array_equal(np.load(path), first)

    # a changed file: a new copy under its new content; the others are not made again
    write_image(data / "train" / "b" / "1.jpg", seed=4242, size=(300, 280))
    os.utime(data / "train" / "b" / "1.jpg", ns=(1, 1))
    again = PreparedImages(tmp_path / "prep", find_images(data), "train", "reduced", 271, store.make,
                           {"p": 1})
    new = again.prepare(rows)
    assert again.made == 1 and new[row] != shas[row]
    assert {r: s for r, s in new.items() if r != row} == {r: s for r, s in shas.items() if r != row}
    assert not np.array_equal(np.asarray(again.load(row)), first)


def test_a_store_that_cannot_be_written_is_one_line(tmp_path):
    data = write_photos(tmp_path / "data", per_class=2)
    (tmp_path / "a-file").write_text("not a folder")
    prep = tmp_path / "a-file" / "prepared"
    r = CliRunner().invoke(cli, ["finetune", str(data), "--model", TINY, "--weights", "none",
                                 "--out", str(tmp_path / "run"), "--prepared-dir", str(prep), "-q",
                                 "--val-fraction", "0.5", "--stages", "head:1", "--init-head", "random"])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert str(prep) in r.output and "--no-prepare" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_photo_twice_is_made_once_and_a_store_inside_the_data_is_not_data(tmp_path):
    data = write_photos(tmp_path / "data", per_class=3)
    for i in range(3):  # the same photo under three more names
        shutil.copy(data / "train" / "a" / "0.jpg", data / "train" / "c" / f"copy{i}.jpg")
    table, _, store = _store(tmp_path, data, "train")
    shas = store.prepare(np.arange(len(table)), threads=4)
    assert store.made == len(set(shas.values())) == 12 and len(shas) == 15  # 3 train + 1 test a class

    inside = data / "cache" / "prepared"  # `cnncodes finetune .` with the default --prepared-dir
    cfg = dict(stages="head:1", prepared_dir=str(inside), val_fraction=0.5)
    first = finetune(tiny_config(data, tmp_path / "run", **cfg), progress=False)
    assert copies(inside, "train") and first.classes == ["a", "b", "c"]
    again = finetune(tiny_config(data, tmp_path / "run", **cfg), overwrite=True, progress=False)
    assert again.classes == ["a", "b", "c"] and again.status == "trained"


def test_evaluation_copies_of_transforms_that_differ_only_in_print_do_not_mix(tmp_path):
    from torchvision import transforms as T
    data = write_photos(tmp_path / "data", per_class=1)
    bb = load_backbone(TINY, "none")
    cfg = tiny_config(data, tmp_path / "run", prepared_dir=str(tmp_path / "prep"))
    squash = SimpleNamespace(preprocessing=bb.preprocessing, split=bb.split,
                             transform=T.Compose([T.Resize((168, 168)), T.CenterCrop(160)]))
    table = find_images(data)
    train_a, eval_a = make_stores(cfg, bb, table)
    train_b, eval_b = make_stores(cfg, squash, table)
    assert train_a.folder == train_b.folder  # training copies depend on the side and filter only
    assert eval_a.folder != eval_b.folder
    assert make_stores(cfg, load_backbone(TINY, "none"), table)[1].folder == eval_a.folder  # stable
