"""What a sweep is asked to do: its arguments checked and normalised once, into one dataclass.

Every later step of a sweep (extraction, LogME, fits, report) reads a :class:`SweepSettings`
instead of a dozen loose arguments, so a wrong setting fails before the first image is read.
Torch-free, like the report, so reading a sweep's settings never loads a network.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cnncodes.extractor.errors import SettingsError
from cnncodes.extractor.files import dataset_name, slug

from cnncodes.pipelines.probes.classifiers import CLASSIFIERS, parse_c_grid, solver_name
from cnncodes.pipelines.probes.metrics import SELECT


def default_report_dir(data, models) -> Path:
    """``reports/<data>-<model>[+<model>...]``, each part made safe as a path component."""
    return Path("reports") / f"{dataset_name(data)}-{'+'.join(slug(m) for m in models)}"


@dataclass(frozen=True)
class SweepSettings:
    """The settings of one sweep, validated.

    Attributes
    ----------
    data : str or path
        Image folder or manifest, as given.
    models : list of str
        Backbones, without repeats, in the order given.
    weights : list
        One ``--weights`` value per backbone.
    layers : str or sequence of str
        The layer spec, resolved per backbone by :func:`~.runner.sweep_layers`.
    classifiers : list of str
        Some of ``CLASSIFIERS``, without repeats, in the order given.
    cache : Path, optional
        The one cache to reuse (one backbone only); None gives each its default cache.
    report : Path
        Report folder; finished fits are kept in its ``fits/``.
    c_grid : tuple of float
        The C values cross-validated, sorted.
    folds, seed, norm, solver, holdout
        As for :func:`~cnncodes.pipelines.probes.classifiers.fit_linear_probe`.
    prescreen : int, optional
        Cross-validate only the ``prescreen`` best layers by LogME of each backbone.
    pool, batch_size, device, runtime
        As for :func:`~cnncodes.extractor.extract`.
    progress : bool
        Whether progress bars are shown.
    """

    data: str | os.PathLike
    models: list
    weights: list
    layers: object
    classifiers: list
    cache: Path | None
    report: Path
    c_grid: tuple
    folds: int = 5
    seed: int = 0
    norm: str = "standard"
    solver: str = "auto"
    holdout: float | None = None
    prescreen: int | None = None
    pool: str = "avg"
    batch_size: int = 32
    device: str = "auto"
    progress: bool = False
    runtime: str | None = None
    select: str = "accuracy"
    class_weight: str | None = None   # balanced: the linear probes' (k-NN has none)
    shots: tuple | None = None        # the few-shot protocol per layer (linear probes), or None
    episodes: int = 5

    @classmethod
    def from_arguments(cls, data, models=None, layers="all-stages",
                       classifiers=("svm", "softmax"), *, weights="DEFAULT", cache=None, report=None,
                       c_grid=None, progress=None, **options) -> SweepSettings:
        """Check and normalise the arguments of :func:`~.runner.sweep`; ``models`` defaults to
        the embedded default backbone; ``options`` are the remaining keywords (``folds``,
        ``seed``, ``norm``, ``solver``, ``holdout``, ``prescreen``, ``pool``, ``batch_size``,
        ``device``, ``runtime``, ``select``, ``class_weight``), kept as given.

        Raises
        ------
        SettingsError
            Unknown classifiers, ``cache`` with several backbones, ``prescreen`` < 1, or a
            number of weights that is neither one nor one per backbone.
        """
        from cnncodes.extractor import DEFAULT_MODEL  # here: its module loads torch, settings need not
        models = list(dict.fromkeys(models or ())) or [DEFAULT_MODEL]
        classifiers = list(dict.fromkeys(classifiers))
        bad = [c for c in classifiers if c not in CLASSIFIERS]
        if bad or not classifiers:
            raise SettingsError(f"--classifier takes {', '.join(CLASSIFIERS)} (comma-separated), "
                                f"got {bad or 'none'}.")
        if cache is not None and len(models) > 1:
            raise SettingsError("--cache names one cache, so it works with one --model; drop it to give "
                                "each backbone its default cache.")
        if "knn" in classifiers and options.get("norm", "standard") not in ("standard", "l2", "power"):
            raise SettingsError(f"the k-NN probe compares unit rows: --norm {options['norm']} "
                                f"does not apply; "
                                f"use l2, power, or the default.")
        if options.get("select", "accuracy") not in SELECT:
            raise SettingsError(f"--select takes {', '.join(SELECT)}, got {options['select']!r}.")
        if options.get("class_weight") in ("none", ""):
            options["class_weight"] = None
        if options.get("class_weight") not in (None, "balanced"):
            raise SettingsError(f"--class-weight takes none or balanced, got {options['class_weight']!r}.")
        if options.get("shots"):
            from cnncodes.pipelines.probes.few_shot import parse_shots
            options["shots"] = parse_shots(options["shots"])
            if options.get("episodes", 5) < 1:
                raise SettingsError(f"--episodes must be >= 1, got {options['episodes']}.")
        prescreen = options.get("prescreen")
        if prescreen is not None and prescreen < 1:
            raise SettingsError(f"--prescreen must be >= 1, got {prescreen}.")
        per_model = _weights_per_model(weights, len(models))
        grid = parse_c_grid(c_grid) if not isinstance(c_grid, (list, tuple)) else tuple(sorted(c_grid))
        return cls(data=data, models=models, weights=per_model, layers=layers,
                   classifiers=classifiers, cache=Path(cache) if cache else None,
                   report=Path(report) if report else default_report_dir(data, models), c_grid=grid,
                   progress=progress if progress is not None else sys.stderr.isatty(), **options)

    def __post_init__(self):
        # one name per solver (``torch`` is ``batched``'s former name): stored fits are keyed by it
        object.__setattr__(self, "solver", solver_name(self.solver))

    @property
    def fits_dir(self) -> Path:
        return self.report / "fits"

    def fit_settings(self) -> dict:
        """What decides a fit besides its codes: part of every stored fit's key."""
        # the selection and the class weights only where not the defaults: fits stored before
        # the options existed keep their keys
        return {"c_grid": list(self.c_grid), "folds": self.folds, "seed": self.seed, "norm": self.norm,
                "solver": self.solver, "holdout": self.holdout,
                **({"select": self.select} if self.select != "accuracy" else {}),
                **({"class_weight": self.class_weight} if self.class_weight else {})}

    def as_dict(self) -> dict:
        """The ``settings`` entry of ``sweep.json``."""
        return {**self.fit_settings(), "classifiers": self.classifiers, "prescreen": self.prescreen,
                **({"shots": list(self.shots), "episodes": self.episodes} if self.shots else {}),
                "pool": self.pool, "models": self.models, "data": str(self.data)}


def _weights_per_model(weights, n_models: int) -> list:
    """One weights value for every backbone: a single value (or a list of one) is repeated."""
    single = weights is None or isinstance(weights, (str, os.PathLike))
    per_model = [weights] * n_models if single else list(weights)
    if len(per_model) == 1:
        per_model *= n_models
    if len(per_model) != n_models:
        raise SettingsError(f"give one --weights for every --model, or one for all: got {len(per_model)} "
                            f"for {n_models} models.")
    return per_model
