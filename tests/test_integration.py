"""Real weights on real photographs (../shared/datasets)."""
import numpy as np
import pytest
import torch

import extractor
from extractor.images import load_rgb

from .conftest import CALTECH, IMAGENET_CHECK, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]


def test_lite0_imagenet_top1_on_the_check_images():
    bb = extractor.load_backbone("efficientnet_lite0")
    rows = [line.split(",") for line in (IMAGENET_CHECK / "labels.csv").read_text().splitlines()[1:]]
    x = torch.stack([bb.transform(load_rgb(IMAGENET_CHECK / f)) for f, _, _ in rows])
    with torch.inference_mode():
        pred = torch.cat([bb.model(x[i:i + 25]) for i in range(0, len(x), 25)]).argmax(1)
    top1 = (pred.numpy() == np.array([int(i) for _, i, _ in rows])).mean()
    assert top1 >= 0.85, top1


def test_extract_real_photos_matches_a_plain_forward(tmp_path):
    files = sorted(CALTECH.glob("test/*/*.jpg"))[::17][:30]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{f},{f.parent.name},test\n" for f in files))
    r = extractor.extract(manifest, tmp_path / "c.h5", layers=["stage3", "blocks.6", "penultimate"],
                          progress=False, batch_size=8)
    assert r.done == 30 and r.layers == {"stage3": 40, "blocks.6": 320, "penultimate": 1280}
    bb = extractor.load_backbone()
    x = torch.stack([bb.transform(load_rgb(f)) for f in files[:4]])
    seen = {}
    bb.model.blocks[6].register_forward_hook(lambda m, i, o: seen.__setitem__("b6", o.mean((2, 3))))
    with torch.inference_mode():
        logits = bb.model(x)
    with extractor.open_cache(r.path) as c:
        np.testing.assert_allclose(c.codes("blocks.6")[:4], seen["b6"].numpy(), rtol=1e-3, atol=1e-4)
        pen = torch.from_numpy(c.codes("penultimate")[:4])
        np.testing.assert_allclose(bb.model.classifier(pen).detach().numpy(), logits.numpy(), rtol=1e-3, atol=1e-3)
        assert c.labels.tolist()[:2] == [0, 1] and np.isfinite(c.codes("stage3")).all()
