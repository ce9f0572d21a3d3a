"""Data sets unlike ImageNet, rebuilt the same way on every machine for the benchmarks.

Omniglot (Lake, Salakhutdinov and Tenenbaum 2015; github.com/brendenlake/omniglot, MIT licence):
handwritten characters of the world's alphabets, 105 x 105 black strokes on white, drawn by 20
people each. Nothing in ImageNet looks like it. Two tasks are built from the repository's two
small background sets (``python/images_background_small{1,2}.zip``: 8 alphabets, 242
characters, 4,840 drawings; Greek and Latin are in both and identical):

- ``omniglot-alphabets``: which of the 8 alphabets a character is written in (8 classes, 340 to
  940 drawings each, 3,630 train / 1,210 test);
- ``omniglot-characters``: which character it is (242 classes, 15 train and 5 test drawings each:
  the few-shot, many-class case).

Both split by drawer: drawers 1-15 train, 16-20 test, so the test images are by people the
training set never saw. The zips come from a local folder or git mirror when given (offline
machines), else from GitHub.

    python benchmarks/datasets.py omniglot-alphabets benchmarks/.work/omniglot-alphabets
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

OMNIGLOT_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}"
TRAIN_DRAWERS = range(1, 16)
TASKS = ("omniglot-alphabets", "omniglot-characters")


def _zip_bytes(name: str, source: str | Path | None) -> bytes:
    """One of the repository's zips: from a folder holding it, a git directory, or GitHub."""
    if source is not None:
        source = Path(source)
        if (source / name).is_file():
            return (source / name).read_bytes()
        if (source / "python" / name).is_file():
            return (source / "python" / name).read_bytes()
        # a bare git mirror of the repository (no work tree)
        return subprocess.run(["git", f"--git-dir={source}", "show", f"HEAD:python/{name}"],
                              check=True, capture_output=True).stdout
    with urllib.request.urlopen(OMNIGLOT_URL.format(name), timeout=60) as response:
        return response.read()


def build_omniglot(root: str | Path, task: str = "omniglot-alphabets",
                   source: str | Path | None = None) -> dict:
    """Write ``root/{train,test}/<class>/<alphabet>-<file>.png``; returns counts per split.

    An existing complete folder is kept as it is (the counts are checked, the files not rewritten).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}")
    root = Path(root)
    done = root / ".complete"
    if done.is_file():
        train, test = (int(v) for v in done.read_text().split())
        return {"train": train, "test": test, "written": 0}
    counts = {"train": 0, "test": 0}
    seen: set[str] = set()
    for name in OMNIGLOT_ZIPS:
        with zipfile.ZipFile(io.BytesIO(_zip_bytes(name, source))) as archive:
            for member in sorted(archive.namelist()):
                parts = member.split("/")
                if not member.endswith(".png") or len(parts) != 4:
                    continue
                _, alphabet, character, filename = parts
                key = f"{alphabet}/{character}/{filename}"
                if key in seen:  # Greek and Latin are in both zips, byte for byte
                    continue
                seen.add(key)
                drawer = int(Path(filename).stem.split("_")[1])
                split = "train" if drawer in TRAIN_DRAWERS else "test"
                label = alphabet if task == "omniglot-alphabets" else f"{alphabet}-{character}"
                path = root / split / label / f"{alphabet}-{filename}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))
                counts[split] += 1
    done.write_text(f"{counts['train']} {counts['test']}\n")
    return {**counts, "written": counts["train"] + counts["test"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("root", type=Path)
    ap.add_argument("--source", help="folder or git mirror holding the Omniglot zips [GitHub]")
    args = ap.parse_args(argv)
    print(build_omniglot(args.root, args.task, args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
