"""Put a benchmark's Markdown table between its markers in the README (shared by the scripts)."""
from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def update_readme(table: str, name: str) -> bool:
    """Replace what lies between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; False
    when the README has no such markers (nothing is written then)."""
    text = README.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    README.write_text(f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")
    return True
