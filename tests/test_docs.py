"""The README and the manual (docs/) stay true: every command line they show names a real command
and only its options, the option tables match the commands, links point to files, every page is
in the site's nav, the README stays a front door, and the benchmark tables stay where the
benchmark scripts write them."""
from __future__ import annotations

import html
import re
import shlex
import sys
from pathlib import Path

import click
import pytest

from cnncodes.pipelines.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MARKDOWN = [README, *PAGES, ROOT / "data" / "README.md", ROOT / "cache" / "README.md"]
# Tables the benchmark scripts rewrite (benchmarks/*.py: update_readme(table, NAME)), as run here.
BENCH_TABLES = ["extract-cpu", "scale-out", "classify-cpu", "finetune-cpu", "startup-cpu"]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "text"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(path: Path):
    """(language, first line number, lines) of every fenced code block of a Markdown file."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        yield lang.lower(), start + 1, body
        i += 1


def shell_commands(path: Path):
    """(where, argv after `cnncodes`) of every cnncodes command in the file's shell blocks:
    `cnncodes ...`, `.venv/bin/cnncodes ...`, `python -m cnncodes ...`, `torchrun ... -m cnncodes ...`,
    several per line (&&, ;, |) and lines continued with a backslash; comments ignored."""
    for lang, first, body in fenced_blocks(path):
        if lang not in SHELL_LANGUAGES:
            continue
        logical, start = "", None
        for n, line in enumerate(body, first):
            if start is None:
                start = n
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            yield from _commands_of(logical, f"{rel(path)}:{start}")
            logical, start = "", None


def _commands_of(line: str, where: str):
    line = re.sub(r"^\s*\$\s+", "", line)  # a prompt before a command whose output follows
    if "cnncodes" not in line:
        return
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:  # not shell (an unbalanced quote in program output)
        return
    segment: list[str] = []
    for tok in [*tokens, ";"]:
        if tok and set(tok) <= set("&|;()<>"):
            argv = _cnncodes_argv(segment)
            if argv is not None:
                yield where, argv
            segment = []
        else:
            segment.append(tok)


def _cnncodes_argv(tokens: list[str]) -> list[str] | None:
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] in ("cnncodes", ".venv/bin/cnncodes"):
        return tokens[1:]
    for i, tok in enumerate(tokens[:-1]):
        runner = Path(tokens[0]).name.startswith(("python", "torchrun"))
        if runner and tok == "-m" and tokens[i + 1] == "cnncodes":
            return tokens[i + 2:]
    return None


def _options(command: click.Command) -> dict[str, click.Parameter]:
    ctx = click.Context(command, info_name=command.name, **command.context_settings)
    return {opt: p for p in command.get_params(ctx) if isinstance(p, click.Option)
            for opt in (*p.opts, *p.secondary_opts)}


def _takes_value(p: click.Option) -> bool:
    return not (p.is_flag or p.count)


def check_argv(argv: list[str]) -> list[str]:
    """What is wrong with `cnncodes ARGV` (empty when it names a command and only its options)."""
    problems: list[str] = []
    group = _options(cli)
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # the group's own options come first
        problems += _check_option(argv, i, group, "cnncodes")
        i += 1 + _value_tokens(argv, i, group)
    if i == len(argv):
        return problems
    name = argv[i]
    if name not in cli.commands:
        return problems + [f"{name!r} is not a command of cnncodes ({', '.join(sorted(cli.commands))})"]
    command = cli.commands[name]
    opts = _options(command)
    i += 1
    while i < len(argv):
        if argv[i] == "--":
            break
        if argv[i].startswith("-") and len(argv[i]) > 1 and not re.match(r"^-\d", argv[i]):
            problems += _check_option(argv, i, opts, f"cnncodes {name}")
            i += 1 + _value_tokens(argv, i, opts)
        else:
            i += 1
    return problems


def _check_option(argv, i, opts, prog) -> list[str]:
    tok = argv[i]
    if tok.startswith("--"):
        name = tok.split("=", 1)[0]
        return [] if name in opts else [f"{prog} has no option {name}"]
    for ch in tok[1:]:  # a cluster of short options: -vv, -j4
        p = opts.get(f"-{ch}")
        if p is None:
            return [f"{prog} has no option -{ch}"]
        if _takes_value(p):
            break
    return []


def _value_tokens(argv, i, opts) -> int:
    """How many of the tokens after argv[i] are the option's value (0 or 1)."""
    tok = argv[i]
    if tok.startswith("--"):
        p = opts.get(tok.split("=", 1)[0])
        return int(p is not None and _takes_value(p) and "=" not in tok)
    for k, ch in enumerate(tok[1:], 1):
        p = opts.get(f"-{ch}")
        if p is None:
            return 0
        if _takes_value(p):
            return int(k == len(tok) - 1)
    return 0


ALL_COMMANDS = [(where, argv) for path in [README, *PAGES] for where, argv in shell_commands(path)]


def test_the_documents_show_commands():
    assert len(ALL_COMMANDS) > 40, "the parser of code blocks found too few cnncodes commands"
    wheres = {w.split(":")[0] for w, _ in ALL_COMMANDS}
    assert {"README.md", "docs/commands.md", "docs/engine.md", "docs/finetune.md"} <= wheres


@pytest.mark.parametrize(("where", "argv"), ALL_COMMANDS,
                         ids=[f"{w} {' '.join(a)[:40]}" for w, a in ALL_COMMANDS])
def test_every_command_line_names_a_real_command_and_its_options(where, argv):
    assert check_argv(argv) == [], f"{where}: cnncodes {shlex.join(argv)}"


def test_the_checker_catches_wrong_commands_and_options():
    assert check_argv(["extract", "data", "--layer", "stage3", "-l", "stage4", "--pool=avg", "-j2"]) == []
    assert check_argv(["--offline", "-vv", "sweep", "data", "-m", "resnet50"]) == []
    assert check_argv(["extrct", "data"]) and check_argv(["extract", "--layers", "x"])
    assert check_argv(["fit-svm", "--cache", "c.h5", "-z"]) and check_argv(["--nope", "info", "c.h5"])
    line = ("torchrun --nproc-per-node 2 -m cnncodes extract d --out c.h5 && "
            "cnncodes info c.h5 --json | head  # and a comment --bogus")
    assert [a for _, a in _commands_of(line, "x")] == [["extract", "d", "--out", "c.h5"],
                                                       ["info", "c.h5", "--json"]]


def inline_commands(path: Path):
    """(where, text) of inline code spans that show a command: `cnncodes NAME [--opt X] ...`, also
    spans that a paragraph wraps onto the next line."""
    text = path.read_text()
    prose = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
    for m in re.finditer(r"`(cnncodes [^`]+)`", prose):
        where = f"{rel(path)}:{text.count(chr(10), 0, m.start()) + 1}"
        yield where, " ".join(m.group(1).replace("\\|", "|").split())


INLINE = [(w, s) for path in [README, *PAGES] for w, s in inline_commands(path)]


@pytest.mark.parametrize(("where", "span"), INLINE, ids=[f"{w} {s[:40]}" for w, s in INLINE])
def test_inline_command_spans_name_real_commands_and_options(where, span):
    words = span.split()[1:]
    group = _options(cli)
    while words and words[0].startswith("-"):
        assert words[0] in group, f"{where}: {span}"
        words = words[1:]
    if not words or not re.match(r"^[a-z][a-z-]*$", words[0]):  # `cnncodes <command>`, `cnncodes ...`
        return
    assert words[0] in cli.commands, f"{where}: {span}"
    opts = _options(cli.commands[words[0]])
    for opt in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", " ".join(words[1:])):
        assert opt in opts or opt in group, f"{where}: {span}: no option {opt}"


def test_the_readme_tour_names_every_command():
    text = README.read_text()
    for name in cli.commands:
        assert f"`cnncodes {name}" in text, f"the README's tour of the commands lacks {name}"


# -- the option tables of docs/commands.md -------------------------------------------------------

def _cell_text(cell: str) -> str:
    cell = cell.strip()
    cell = re.sub(r"^<code>(.*)</code>$", r"\1", cell)
    cell = re.sub(r"^`(.*)`$", r"\1", cell)
    return html.unescape(cell.replace("\\|", "|").replace("\\*", "*"))


def documented_tables() -> dict[str, dict[str, str]]:
    """{command name ('' for the group): {option cell: help cell}} from docs/commands.md."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in (DOCS / "commands.md").read_text().splitlines():
        if line.startswith("## The group's options"):
            current = tables.setdefault("", {})
        elif m := re.match(r"^### `cnncodes ([\w-]+)`", line):
            current = tables.setdefault(m.group(1), {})
        elif line.startswith("| ") and current is not None and not line.startswith("| option |"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            current[_cell_text(cells[0])] = " ".join(_cell_text(cells[1]).split())
    return tables


def help_records(command: click.Command, parent: click.Context | None = None) -> dict[str, str]:
    ctx = click.Context(command, info_name=command.name or "cnncodes", parent=parent,
                        **command.context_settings)
    records = {}
    for p in command.get_params(ctx):
        if isinstance(p, click.Option) and "--help" not in p.opts:
            opts, help_ = p.get_help_record(ctx)
            records[" ".join(opts.split())] = " ".join(help_.split())
    return records


def test_the_option_tables_agree_with_the_commands_help():
    tables = documented_tables()
    assert set(tables) == {"", *cli.commands}, "docs/commands.md: a section per command, and the group's"
    group_ctx = click.Context(cli, info_name="cnncodes", **cli.context_settings)
    expected = {"": help_records(cli), **{n: help_records(c, group_ctx) for n, c in cli.commands.items()}}
    problems = []
    for name, records in expected.items():
        documented = tables[name]
        missing = {k: v for k, v in records.items() if k not in documented}
        extra = sorted(set(documented) - set(records))
        changed = {k: v for k, v in records.items() if k in documented and documented[k] != v}
        if missing or extra or changed:
            problems.append(f"cnncodes {name or '(group)'}: rows to add {missing}, rows to drop {extra}, "
                            f"rows whose text `--help` now gives as {changed}")
    assert not problems, "docs/commands.md disagrees with --help:\n" + "\n".join(problems)


# -- links, pages, the README's size --------------------------------------------------------------

def relative_links(path: Path):
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)      # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)                  # code spans
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if not re.match(r"^(?:[a-z]+:|#)", target):
            yield target


def test_every_relative_link_points_to_a_file():
    checked = 0
    for path in MARKDOWN:
        for target in relative_links(path):
            file = (path.parent / target.split("#", 1)[0]).resolve()
            assert file.exists(), f"{rel(path)} links to {target}, which does not exist"
            checked += 1
    assert checked > 30


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for page in PAGES:
        assert f"](docs/{page.name})" in text, f"the README does not link to docs/{page.name}"
    for tag in ("main", "test"):  # .ci/run extracts and runs these, exactly as written
        block = re.search(rf"<!-- ci:{tag} -->\n```bash\n(.+)\n```\n<!-- /ci:{tag} -->", text)
        assert block and block.group(1).startswith("python3 -m venv .venv && "), tag


def test_every_page_is_in_the_sites_nav_and_every_nav_entry_is_a_page():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["name"] == "material" and config["docs_dir"] == "docs"

    def entries(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from entries(value) if isinstance(value, list) else [value]

    nav = list(entries(config["nav"]))
    assert sorted(nav) == sorted(p.name for p in PAGES) and len(nav) == len(set(nav))
    assert nav[0] == "index.md" and len(PAGES) >= 6


def test_the_demo_output_is_the_same_in_the_readme_and_getting_started():
    def output(path):
        return next(body for lang, _, body in fenced_blocks(path) if body and body[0].startswith("model "))
    assert output(README) == output(DOCS / "getting-started.md")


# -- benchmark tables -----------------------------------------------------------------------------

def bench_blocks() -> dict[str, list[tuple[str, str]]]:
    blocks: dict[str, list[tuple[str, str]]] = {}
    for path in [README, *PAGES]:
        text = path.read_text()
        starts = re.findall(r"^<!-- bench:([\w-]+) -->$", text, flags=re.M)
        ends = re.findall(r"^<!-- /bench:([\w-]+) -->$", text, flags=re.M)
        assert starts == ends, f"{rel(path)}: unbalanced bench markers"
        for name in starts:
            body = text.split(f"<!-- bench:{name} -->", 1)[1].split(f"<!-- /bench:{name} -->", 1)[0]
            blocks.setdefault(name, []).append((rel(path), body))
    return blocks


def test_every_benchmark_table_is_where_its_script_writes_and_one_table_everywhere():
    blocks = bench_blocks()
    assert set(BENCH_TABLES) <= set(blocks)
    for name, found in blocks.items():
        assert len({body for _, body in found}) == 1, f"bench:{name} differs between {[w for w, _ in found]}"
        assert "docs/benchmarks.md" in [w for w, _ in found], f"bench:{name} is not on the benchmarks page"


def test_the_benchmark_scripts_rewrite_a_table_in_every_file_that_shows_it(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    for path in [README, *PAGES]:
        (tmp_path / rel(path)).write_text(path.read_text())
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("readme_table", None)
    import readme_table
    monkeypatch.setattr(readme_table, "ROOT", tmp_path)
    monkeypatch.setattr(readme_table, "README", tmp_path / "README.md")
    assert readme_table.update_readme("| new |\n|---|", "extract-cpu")
    assert not readme_table.update_readme("| new |", "no-such-table")
    for path in (tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"):
        assert "<!-- bench:extract-cpu -->\n| new |\n|---|\n<!-- /bench:extract-cpu -->" in path.read_text()
    assert (tmp_path / "docs" / "cache.md").read_text() == (DOCS / "cache.md").read_text()
    sys.modules.pop("readme_table", None)


def test_the_house_map_names_every_module():
    """docs/development.md has a table per folder with a row per module, and no row for a module
    that is gone."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in (DOCS / "development.md").read_text().splitlines():
        if m := re.match(r"^### `([\w/]+/)`", line):
            current = sections.setdefault(m.group(1), set())
        elif line.startswith("#"):
            current = None
        elif current is not None and (m := re.match(r"^\| `([\w.]+)` \|", line)):
            current.add(m.group(1))
    folders = ["cnncodes/", "benchmarks/", *(f"{d.relative_to(ROOT)}/" for top in ("extractor", "pipelines")
                                            for d in [ROOT / top, *sorted((ROOT / top).rglob("*/"))]
                                            if (d / "__init__.py").exists())]
    for folder in folders:
        modules = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        assert sections.get(folder) is not None, f"docs/development.md has no section for {folder}"
        missing = modules - sections[folder]
        assert not missing, f"docs/development.md, {folder}: no row for {missing}"
        stale = {n for n in sections[folder] if n.endswith(".py")} - modules - {"__init__.py"}
        assert not stale, f"docs/development.md, {folder}: rows for modules that are gone: {stale}"
