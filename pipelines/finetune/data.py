"""Images for fine-tuning: train/val/test splits, augmentation, and loaders whose randomness
depends only on (seed, epoch, image), so a resumed run sees exactly the batches and crops an
uninterrupted one would have seen, whatever the number of workers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from cnncodes.extractor.images import ImageTable
from cnncodes.extractor.sources import find_images

from cnncodes.pipelines.finetune.freezing import FinetuneError

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Row indices of ``table`` per part; ``test`` may be empty (then the report uses val)."""

    table: ImageTable
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def make_splits(data, val_fraction: float = 0.1, seed: int = 0, exclude=None) -> Splits:
    """Use the data's split folders; without a ``val`` split, hold out a stratified
    ``val_fraction`` of train (fixed ``seed``). Unlabelled rows are ignored. ``exclude``: as
    :func:`~cnncodes.extractor.sources.find_images`' (a store inside the data folder)."""
    table = find_images(data, exclude=exclude)
    labelled = np.flatnonzero(table.labels >= 0)
    splits = np.asarray(table.splits)
    if len(table.classes) < 2:
        raise FinetuneError(f"{data} has {len(table.classes)} class(es); fine-tuning needs at least 2.")
    has_splits = any(s for s in table.splits)
    train = labelled[splits[labelled] == "train"] if has_splits else labelled
    val = labelled[splits[labelled] == "val"]
    test = labelled[splits[labelled] == "test"]
    if has_splits and not len(train):
        raise FinetuneError(f"the train split of {data} is empty: put images in {data}/train/<class>/.")
    if not len(val):
        if not 0 < val_fraction < 1:
            raise FinetuneError(f"{data} has no val split and --val-fraction is {val_fraction}; "
                                f"early stopping needs validation images: use e.g. --val-fraction 0.1.")
        from sklearn.model_selection import train_test_split
        y = table.labels[train]
        counts = np.bincount(y, minlength=len(table.classes))
        stratify = y if counts[counts > 0].min() >= 2 else None
        try:
            train, val = train_test_split(train, test_size=val_fraction, random_state=seed, stratify=stratify)
        except ValueError as e:  # too few images for the fraction
            raise FinetuneError(f"cannot hold out --val-fraction {val_fraction} of {len(train)} "
                                f"training images: {e}") from None
        train, val = np.sort(train), np.sort(val)
    for part, rows in (("train", train), ("val", val)):
        if not len(rows):
            raise FinetuneError(f"the {part} split of {data} is empty.")
    present = np.unique(table.labels[train])
    if len(present) < 2:
        raise FinetuneError(f"the train split of {data} has images of {len(present)} class(es); "
                            f"fine-tuning needs at least 2.")
    return Splits(table, train, val, test)


# The training augmentations: the smallest random crop as a share of the image's area (None: the
# weights' own resize and centre crop, no randomness), and a policy of colour and geometry ops
# after the crop. `standard` is torchvision's RandomResizedCrop (8% to all of the area) and a
# flip, the seeds' augmentation and the only one before this setting.
AUGMENTS = {"none": (None, None), "light": (0.35, None), "standard": (0.08, None),
            "trivialaugment": (0.08, "trivialaugment"), "randaugment": (0.08, "randaugment")}


def train_min_size(decode: str, preprocessing: dict, augment: str = "standard") -> tuple[int, int] | None:
    """The ``min_size`` of a reduced decode for training images: the smallest random crop still
    holds the crop size's pixels, so a reduced decode never blurs a training crop (evaluation's
    resize needs fewer: :func:`~cnncodes.extractor.decoding.decode_min_size`)."""
    if decode != "reduced":
        return None
    side = training_side(preprocessing, augment)
    return side, side


def training_side(preprocessing: dict, augment: str = "standard") -> int:
    """The short side at which the smallest random crop of ``augment`` still holds the crop
    size's pixels (the weights' resize for ``none``): what training reads of an image."""
    smallest = AUGMENTS[augment][0]
    if smallest is None:
        return int(preprocessing["resize"])
    return math.ceil(int(preprocessing["crop"]) / math.sqrt(smallest))


def train_transform(preprocessing: dict, augment: str = "standard"):
    """The training images' transform at the weights' crop size, interpolation and
    normalisation: a random resized crop of at least the preset's share of the area, a
    horizontal flip and the preset's policy (TrivialAugment, RandAugment), or (``none``) the
    weights' resize and centre crop alone."""
    from torchvision import transforms as T
    if augment not in AUGMENTS:
        raise FinetuneError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}.")
    smallest, policy = AUGMENTS[augment]
    interp = T.InterpolationMode(preprocessing.get("interpolation", "bilinear"))
    crop = int(preprocessing["crop"])
    if smallest is None:
        ops = [T.Resize(int(preprocessing["resize"]), interpolation=interp), T.CenterCrop(crop)]
    else:
        ops = [T.RandomResizedCrop(crop, scale=(smallest, 1.0), interpolation=interp),
               T.RandomHorizontalFlip()]
    if policy == "trivialaugment":
        ops.append(T.TrivialAugmentWide(interpolation=interp))
    elif policy == "randaugment":
        ops.append(T.RandAugment(num_ops=2, magnitude=9, interpolation=interp))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(preprocessing["mean"], preprocessing["std"])])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2 ** 63)


class ImageDataset(torch.utils.data.Dataset):
    """``(tensor or None, label, row)`` per image; an image that fails to decode gives None
    (the collate function drops it and reports its row) instead of stopping the run.
    ``min_size`` asks for a reduced decode (:func:`cnncodes.extractor.images.decode_rgb`);
    ``store`` (:class:`~.prepared.PreparedImages`) holds the copies of the rows that have one:
    a training copy goes through ``transform`` as a decoded file would, an evaluation copy is
    already what ``transform`` makes."""

    def __init__(self, table: ImageTable, rows, transform, seed: int | None = None,
                 min_size: tuple[int, int] | None = None, store=None):
        self.table, self.rows, self.transform, self.seed = table, np.asarray(rows), transform, seed
        self.min_size, self.store = min_size, store
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        label = int(self.table.labels[row])
        try:
            if self.store is not None and row in self.store:
                img = self.store.load(row)
                if self.store.finish is not None:
                    return img, label, row
            else:
                img = self.table.load(row, min_size=self.min_size)
        except Exception as e:  # any decode failure: recorded, skipped
            log.debug("skipping %s: %s", self.table.paths[row], e)
            return None, label, row
        if self.seed is None:
            return self.transform(img), label, row
        # Per-image seeding: the crop and flip of an image depend on (seed, epoch, row) only,
        # not on which worker or batch it lands in, so resume and any --workers agree.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, row))
            return self.transform(img), label, row


def collate(items):
    """``(images, labels, rows, failed rows)``: the decoded images stacked, with their table rows,
    and the rows that failed to decode (images and labels are None when all did)."""
    good = [it for it in items if it[0] is not None]
    failed = [it[2] for it in items if it[0] is None]
    if not good:
        return None, None, [], failed
    return (torch.stack([it[0] for it in good]), torch.tensor([it[1] for it in good]),
            [it[2] for it in good], failed)


def make_loader(dataset: ImageDataset, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0,
                world: int = 1, workers: int = 0, pin_memory: bool = False):
    """A loader over this rank's share. Training shuffles with torch's DistributedSampler
    (seeded; ``set_epoch`` per epoch; equal shares so DDP ranks step together); evaluation
    takes every ``world``-th image, so the ranks' shares add up to the whole split."""
    if shuffle:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                      shuffle=True, seed=seed, drop_last=world > 1)
    else:
        sampler = list(range(rank, len(dataset), world))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(seed))
