"""What ``extract`` will do with an output path, decided before any network is loaded.

:func:`plan_extraction` reads only the cache's attributes, its content columns and journal
(numpy and h5py, no torch) and returns an :class:`ExtractionPlan`: create the cache, resume
it, add layers to it, or leave it (up to date); or it raises with the reasons it must refuse.
The engine then runs the plan; nothing here writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .cache import changed_rows, open_cache, read_attrs
from .errors import CacheError, IncompatibleCacheError
from .journal import Journal
from .recipe import Recipe

CREATE, RESUME, ADD_LAYERS, UP_TO_DATE = "create", "resume", "add layers", "up to date"


def companion_path(path: Path) -> Path:
    """Where layers being added to ``path`` are extracted first (a cache of its own)."""
    return path.with_name(path.name + ".adding.h5")


@dataclass(frozen=True)
class ExtractionPlan:
    """What to do with the cache at ``path``.

    Attributes
    ----------
    action : {'create', 'resume', 'add layers', 'up to date'}
    layers : tuple of str
        The layers the cache at ``path`` holds when the plan has run (a resumed row needs every
        layer the cache has, so a resume extracts all of them).
    new_layers : tuple of str
        ``add layers``: extracted into :attr:`companion`, then copied into the cache.
    finish_first : bool
        ``add layers`` to an unfinished cache: resume its own layers first.
    replace : bool
        ``create`` over an existing file or cache (``overwrite``).
    """

    action: str
    path: Path
    layers: tuple[str, ...]
    new_layers: tuple[str, ...] = ()
    finish_first: bool = False
    replace: bool = False

    @property
    def companion(self) -> Path:
        return companion_path(self.path)

    @property
    def create(self) -> bool:
        return self.action == CREATE


def plan_extraction(path: str | Path, recipe: Recipe, layers, *, overwrite: bool = False,
                    table=None) -> ExtractionPlan:
    """Decide what extracting ``layers`` by ``recipe`` into ``path`` means.

    ``table`` (the :class:`~.images.ImageTable` being extracted) lets the plan see files whose
    size or mtime moved since their codes were made: a finished cache is then resumed (the run
    re-extracts the rows whose content changed), not up to date.

    Raises :class:`~.errors.CacheError` when ``path`` holds something that is not a readable
    cache, and :class:`~.errors.IncompatibleCacheError` when it is a cache of another recipe or
    image list; both unless ``overwrite``.

    Examples
    --------
    >>> plan_extraction("cache/new.h5", recipe, ["stage3"]).action  # doctest: +SKIP
    'create'
    """
    path = Path(path)
    layers = tuple(dict.fromkeys(layers))
    if overwrite or not path.exists():
        return ExtractionPlan(CREATE, path, layers, replace=overwrite and path.exists())
    try:
        attrs = read_attrs(path)
    except CacheError as e:
        raise CacheError(f"{e} Refusing to overwrite it: choose another --out, "
                         f"or pass --overwrite.") from None
    if int(attrs.get("schema_version", 1)) < 2 and table is not None:
        recipe = recipe.replace(image_fingerprint=table.fingerprint())  # schema 1 covered file sizes
    diffs = Recipe.from_attrs(attrs).differences(recipe)
    if diffs:
        raise IncompatibleCacheError(f"{path} was made by a different recipe: " + "; ".join(diffs) + ".",
                                     path=path, reasons=diffs,
                                     remedy="Pass --overwrite to replace it, or choose another --out.")
    held = tuple(attrs["layers"])
    unfinished = not attrs.get("complete") or bool(Journal(path).shards()) or _files_moved(path, table)
    missing = tuple(name for name in layers if name not in held)
    if missing:
        return ExtractionPlan(ADD_LAYERS, path, held, new_layers=missing, finish_first=unfinished)
    return ExtractionPlan(RESUME if unfinished else UP_TO_DATE, path, held)


def _files_moved(path: Path, table) -> bool:
    if table is None:
        return False
    with open_cache(path) as c:
        return bool(len(changed_rows(c.content, c.status, table.sizes, table.mtimes)))
