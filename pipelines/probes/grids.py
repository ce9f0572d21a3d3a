"""Comma-separated lists of whole numbers on command lines (``--k-grid``, ``--shots``), parsed once."""
from __future__ import annotations

from cnncodes.extractor.errors import SettingsError


def parse_whole_numbers(text, option: str, example: str = "1,5,10") -> tuple[int, ...]:
    """``"10,1, 5"`` (or a sequence) -> (1, 5, 10): sorted, distinct, every value >= 1; errors name
    ``option``."""
    values = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        numbers = tuple(sorted({int(str(v).strip()) for v in values if str(v).strip()}))
    except ValueError:
        raise SettingsError(f"{option} must be comma-separated whole numbers such as {example}, "
                            f"got {text!r}.") from None
    if not numbers or min(numbers) < 1:
        raise SettingsError(f"{option} values must be whole numbers >= 1, got {text!r}.")
    return numbers
