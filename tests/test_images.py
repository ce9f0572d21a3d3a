
import numpy as np
import pytest
from PIL import Image

from cnncodes.extractor.errors import ImageSourceError
from cnncodes.extractor.images import load_rgb, to_rgb
from cnncodes.extractor.sources import find_images

from .conftest import write_image


def test_image_folder_layout(image_folder):
    t = find_images(image_folder)
    assert t.classes == ["cat", "dog", "eel"]
    assert len(t) == 12 and t.paths[0] == "cat/0.png"
    assert t.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert set(t.splits) == {""}


def test_split_layout_records_split_per_image(split_folder):
    t = find_images(split_folder)
    assert t.classes == ["a", "b"]
    assert t.splits.count("train") == 10 and t.splits.count("test") == 4
    assert t.paths[0] == "train/a/0.png" and t.paths[-1] == "test/b/1.png"  # train, val, test order


def test_manifest_with_relative_paths_and_unlabelled_rows(image_folder, tmp_path):
    csv = image_folder / "list.csv"
    csv.write_text("path,label,split\ncat/0.png,cat,train\ndog/1.png,dog,test\neel/2.png,,\n")
    t = find_images(csv)
    assert t.paths == ["cat/0.png", "dog/1.png", "eel/2.png"]
    assert t.labels.tolist() == [0, 1, -1] and t.splits == ["train", "test", ""]
    assert (t.root / t.paths[0]).is_file()


def test_bad_manifest_and_empty_folder(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,class\nx.png,a\n")
    with pytest.raises(ImageSourceError, match="header 'path,label"):
        find_images(bad)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ImageSourceError, match="no images found"):
        find_images(tmp_path / "empty")
    with pytest.raises(ImageSourceError, match="does not exist"):
        find_images(tmp_path / "nope")


def test_fingerprint_tracks_the_image_list(image_folder):
    a = find_images(image_folder).fingerprint()
    assert find_images(image_folder).fingerprint() == a
    write_image(image_folder / "cat" / "9.png", seed=99)
    assert find_images(image_folder).fingerprint() != a


def test_hidden_files_skipped_but_junk_is_a_candidate(image_folder):
    (image_folder / "cat" / ".DS_Store").write_bytes(b"x")
    (image_folder / "cat" / "notes.txt").write_text("not an image")
    t = find_images(image_folder)
    assert "cat/notes.txt" in t.paths and "cat/.DS_Store" not in t.paths


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    p = write_image(tmp_path / f"x.{ 'tif' if mode == 'CMYK' else 'png'}", seed=1, mode=mode)
    img = load_rgb(p)
    assert img.mode == "RGB" and img.size == (40, 32)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = np.full((8, 8), 32768, dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    img = load_rgb(p)
    assert abs(int(np.asarray(img)[0, 0, 0]) - 128) <= 1


def test_transparent_pixels_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif)
    assert load_rgb(p).size == (20, 40)


def test_truncated_empty_and_non_images_raise(tmp_path):
    good = write_image(tmp_path / "g.jpg", seed=3, size=(64, 64))
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("trunc.jpg", "empty.jpg", "text.jpg"):
        with pytest.raises(OSError):
            load_rgb(tmp_path / name)
