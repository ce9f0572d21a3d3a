"""Exceptions raised by the extractor library.

Every error is a :class:`CnnCodesError` (most also a ``ValueError``, ``OSError`` or
``RuntimeError``, as Python would raise for the same fault) with a message written for people:
what was wrong, what was expected and how to fix it. Only the CLI turns them into exit codes.
"""


class CnnCodesError(Exception):
    """Base class of every error the library raises on purpose."""


class ImageSourceError(CnnCodesError, ValueError):
    """The image folder or manifest cannot be read (missing, empty, malformed)."""


class ModelNotFoundError(CnnCodesError, ValueError):
    """The model name is not known to cnncodes, torchvision or timm."""


class WeightsNotFoundError(CnnCodesError, FileNotFoundError):
    """Pretrained weights are not available offline."""


class LayerNotFoundError(CnnCodesError, ValueError):
    """A requested layer is not a tappable module of the model."""


class PoolingError(CnnCodesError, ValueError):
    """A pooling specification cannot be parsed."""


class CacheError(CnnCodesError, ValueError):
    """A cache file is unreadable, not a cnncodes cache, or of a newer format."""


class IncompatibleCacheError(CacheError):
    """An existing cache was made by a different recipe than the one requested.

    ``path``, ``reasons`` and ``remedy`` are the parts of the message; a caller with other
    options than ``extract``'s words the remedy anew with :meth:`with_remedy`.
    """

    def __init__(self, message: str, *, path=None, reasons=(), remedy: str = ""):
        super().__init__(f"{message} {remedy}".strip())
        self.head, self.path, self.reasons, self.remedy = message, path, list(reasons), remedy

    def with_remedy(self, remedy: str) -> "IncompatibleCacheError":
        return IncompatibleCacheError(self.head, path=self.path, reasons=self.reasons, remedy=remedy)


class CacheWriteError(CacheError, OSError):
    """A cache could not be written (a full disk, a read-only folder); what was saved stays."""


class CacheLockedError(CacheError, RuntimeError):
    """Another process is writing the same cache."""


class ImageDecodeError(CnnCodesError, RuntimeError):
    """An image failed to decode and ``strict`` was requested."""


class SettingsError(CnnCodesError, ValueError):
    """A setting has a value the library cannot use (an unknown device, a batch size of 0...)."""


class OutputError(CnnCodesError, OSError):
    """An output file or folder cannot be written (missing folder, read-only, no permission)."""
