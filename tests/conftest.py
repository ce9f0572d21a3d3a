"""Shared fixtures: small generated image folders, fixed-weight tiny-ish models, shared data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# PyTorch runs the network unless a test asks for a runtime (tests/test_runtimes.py): the suite
# pins PyTorch's own codes, and an export per extraction would slow it down. Set for the whole
# session (module-scoped fixtures extract before any function-scoped monkeypatch applies).
os.environ["CNNCODES_RUNTIME"] = "torch"

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CALTECH = SHARED / "datasets" / "caltech101-mini"
IMAGENET_CHECK = SHARED / "datasets" / "imagenet-check"

needs_shared = pytest.mark.skipif(not CALTECH.is_dir(), reason="../shared/datasets is not beside the repo")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def write_image(path: Path, seed: int, size=(40, 32), mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """root/<class>/<img>: 3 classes x 4 images, 40x32 px PNGs."""
    root = tmp_path / "imgs"
    for c, cls in enumerate(["cat", "dog", "eel"]):
        for i in range(4):
            write_image(root / cls / f"{i}.png", seed=10 * c + i)
    return root


@pytest.fixture
def photos(tmp_path) -> Path:
    """root/<class>/<img>: 2 classes x 6 images, 48x40 px PNGs (enough rows for 2-fold CV)."""
    for c, cls in enumerate(["a", "b"]):
        for i in range(6):
            write_image(tmp_path / "imgs" / cls / f"{i}.png", seed=100 * c + i, size=(48, 40))
    return tmp_path / "imgs"


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """root/train|test/<class>/<img>: 2 classes, 5 train + 2 test each."""
    return write_split_folder(tmp_path / "split")


def write_split_folder(root: Path) -> Path:
    for c, cls in enumerate(["a", "b"]):
        for i in range(5):
            write_image(root / "train" / cls / f"{i}.png", seed=100 + 10 * c + i)
        for i in range(2):
            write_image(root / "test" / cls / f"{i}.png", seed=200 + 10 * c + i)
    return root


@pytest.fixture(scope="session")
def r18_weights(tmp_path_factory) -> Path:
    """A fixed (seeded) resnet18 state dict with non-trivial batch-norm statistics."""
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def caltech_cache(tmp_path_factory) -> Path:
    """The penultimate codes of every shared Caltech photo (train and test), real Lite0 weights:
    extracted once for the tests that need real codes."""
    if not CALTECH.is_dir():
        pytest.skip("../shared/datasets is not beside the repo")
    from cnncodes import extractor
    path = tmp_path_factory.mktemp("caltech") / "codes.h5"
    extractor.extract(CALTECH, path, layers=["penultimate"], progress=False, batch_size=32)
    return path


@pytest.fixture(autouse=True)
def _offline_torch_home(tmp_path, monkeypatch):
    """No test may find (or fetch) weights from the developer's own hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
