"""Put a benchmark's Markdown table between its markers in the README and the manual (shared by
the scripts)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def marked_files() -> list[Path]:
    """The files a table may live in: the README, then the manual's pages (docs/*.md)."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def publish(result: dict, path: Path, table: str, name: str, update: bool) -> None:
    """A benchmark's last step: its JSON ``result`` written to ``path``, its Markdown ``table``
    printed, and with ``update`` put between the ``bench:NAME`` markers (:func:`update_readme`)."""
    import json
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    if update:
        update_readme(table, name)


def update_readme(table: str, name: str) -> bool:
    """Replace what lies between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in every file
    of :func:`marked_files` that holds both markers (a headline table shown in the README and on
    the benchmarks page is one table); False when no file has them (nothing is written then)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    found = False
    for path in marked_files():
        text = path.read_text()
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        path.write_text(f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")
        found = True
    return found
