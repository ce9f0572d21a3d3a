"""What a fine-tuning run reports: :class:`FinetuneResult`, whose :meth:`~FinetuneResult.as_dict`
is the ``result.json`` of the run folder."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FinetuneResult:
    """The summary of a fine-tuning run.

    Attributes
    ----------
    run_dir : str
        The run folder.
    status : str
        ``trained``, ``resumed``, ``extended`` (a finished run given more epochs of its last
        stage) or ``up to date`` (nothing was left to train).
    model : str
        The backbone.
    from_scratch : bool
        Whether it started from random weights.
    evaluated_on : str
        ``test``, or ``val`` when the data has no test split.
    accuracy : float
        The best epoch's accuracy on ``evaluated_on``.
    best_epoch : int or None
        The epoch (from 0) of the best val accuracy, whose weights are ``best.pt``.
    best_val_accuracy : float
    epochs_run : int
    seconds, train_seconds, seconds_per_epoch : float
        Wall time of this call, time spent training over all epochs, and per epoch.
    stages : list of dict
        Per stage: name, epochs, module, epochs run, trainable parameters, seconds per epoch
        and best val accuracy.
    images : dict
        Images per split.
    failed_images : list of str
        Images that failed to decode (skipped).
    device, precision : str
    world_size : int
        Processes of a DDP run (1 without).
    rank_digests : list of str
        sha256 of every rank's final weights.
    recipe : dict
        The settings a resume must match.
    versions : dict
        Library versions.
    classes : list of str
    confusion : list of list of int, optional
        On ``evaluated_on``; set when the report is written.
    files : dict
        The report's files by kind; set when the report is written.
    head_init : dict, optional
        How the new head started (:class:`~cnncodes.pipelines.finetune.head_init.HeadInit`):
        ``kind`` (``probe`` or ``random``), the probe's ``C`` and CV accuracy, or ``why`` random.
    """

    run_dir: str
    status: str
    model: str
    from_scratch: bool
    evaluated_on: str
    accuracy: float
    best_epoch: int | None
    best_val_accuracy: float
    epochs_run: int
    seconds: float
    train_seconds: float
    seconds_per_epoch: float
    stages: list
    images: dict
    failed_images: list
    device: str
    precision: str
    world_size: int
    rank_digests: list
    recipe: dict
    versions: dict
    classes: list = field(default_factory=list)
    confusion: list | None = None
    files: dict = field(default_factory=dict)
    head_init: dict | None = None

    @property
    def test_accuracy(self) -> float | None:
        """The accuracy on the test split; None when the data has none."""
        return self.accuracy if self.evaluated_on == "test" else None

    @property
    def ranks_agree(self) -> bool:
        """Whether every DDP rank ended with the same weights (always true on one process)."""
        return len(set(self.rank_digests)) == 1

    def as_dict(self) -> dict:
        """The run's ``result.json``: ``<evaluated_on>_accuracy`` and ``test_accuracy`` (the same
        entry when evaluated on test), then the rest in the file's order."""
        return {"run_dir": self.run_dir, "status": self.status, "model": self.model,
                "from_scratch": self.from_scratch, "evaluated_on": self.evaluated_on,
                f"{self.evaluated_on}_accuracy": self.accuracy, "test_accuracy": self.test_accuracy,
                "best_epoch": self.best_epoch, "best_val_accuracy": self.best_val_accuracy,
                "epochs_run": self.epochs_run, "seconds": self.seconds, "train_seconds": self.train_seconds,
                "seconds_per_epoch": self.seconds_per_epoch, "stages": self.stages, "images": self.images,
                "failed_images": self.failed_images, "device": self.device, "precision": self.precision,
                "world_size": self.world_size, "rank_digests": self.rank_digests,
                "ranks_agree": self.ranks_agree, "recipe": self.recipe, "versions": self.versions,
                "confusion": self.confusion, "classes": self.classes, "files": self.files,
                "head_init": self.head_init}


def stage_summary(stages, history: list[dict]) -> list[dict]:
    """Per stage of the schedule: its spec and what its epochs in ``history`` did, with its
    validation and training accuracy per epoch (what :func:`convergence` reads)."""
    out = []
    for s in stages:
        hs = [h for h in history if h["stage"] == s.name]
        out.append({**s.as_dict(), "epochs_run": len(hs),
                    "trainable_params": hs[0]["trainable_params"] if hs else None,
                    "seconds_per_epoch": round(sum(h["seconds"] for h in hs) / len(hs), 2) if hs else None,
                    "best_val_accuracy": max((h["val_accuracy"] for h in hs), default=None),
                    "val_accuracy_by_epoch": [round(h["val_accuracy"], 4) for h in hs],
                    "train_accuracy_by_epoch": [round(h["train_accuracy"], 4) for h in hs]})
    return out


# A run has not converged while its last stage's validation accuracy still climbs by this much
# from the epoch before to its last (its best) epoch, or while its training accuracy still
# climbs by TRAIN_RISE at its last epoch from below TRAIN_SATURATED.
STILL_RISING = 0.01
TRAIN_RISE, TRAIN_SATURATED = 0.02, 0.9


def convergence(stages: list[dict]) -> str | None:
    """Why a run's last stage had not converged, in words (None: it had, by these signs).

    The signs: validation accuracy still rising at the last epoch (it is the best epoch and
    rose by at least a point over the one before); training accuracy still rising by 2 points
    or more while below 0.9 (far from saturation); or a single epoch, which shows no trend.
    A run stopped early by ``--patience`` had converged by definition.
    """
    last = next((s for s in reversed(stages) if s.get("epochs_run")), None)
    if last is None or last["epochs_run"] < last.get("epochs", last["epochs_run"]):
        return None  # ended by --patience: validation accuracy had stopped rising
    val, train = last.get("val_accuracy_by_epoch") or [], last.get("train_accuracy_by_epoch") or []
    if len(val) < 2:
        return (f"its last stage ({last['name']}) ran {len(val)} epoch, too few to show whether "
                f"validation accuracy had stopped rising") if val else None
    if val[-1] >= max(val) and val[-1] - val[-2] >= STILL_RISING:
        return (f"validation accuracy was still rising at its last epoch ({val[-2]:.3f} -> {val[-1]:.3f} "
                f"in {last['name']})")
    if len(train) >= 2 and train[-1] < TRAIN_SATURATED and train[-1] - train[-2] >= TRAIN_RISE:
        return (f"training accuracy was still rising far from saturation ({train[-2]:.3f} -> "
                f"{train[-1]:.3f} in {last['name']})")
    return None
