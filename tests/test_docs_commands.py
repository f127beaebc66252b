"""Every `chatvec` command in the docs' fenced code blocks is one the CLI accepts.

The commands are parsed and validated by click (subcommand, options, choices, types, required
options, extra arguments) without being run: `cmd.make_context` stops before the callback.
Placeholders such as `CP` or `s3://bucket/x` are valid string values, so the check is about the
command line's shape, which is what goes stale when an option is renamed or removed."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from chatvec.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
# blocks of data or code (```yaml, ```python) hold no commands; a plain fence may
NOT_SHELL = {"yaml", "yml", "json", "python", "py", "toml", "ini", "html", "text", "txt"}
# `chatvec` followed by a word of another shape is prose, as in a diagram's "chatvec CLI"
SUBCOMMAND = re.compile(r"^[a-z][a-z0-9-]*$|^-")
PREFIXES = ("$ ", ".venv/bin/")
# a command run through another one: `ray job submit ... -- chatvec ...`, `cd x && chatvec ...`
HANDOFF = ("--", "&&", ";", "||")
# where the shell takes over from the command's own arguments
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>>"}


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/merging.md:12", the line the command starts on
    argv: tuple[str, ...]  # after "chatvec"


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a fenced code block that may hold commands."""
    inside, fence, keep, out = False, "", False, []
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and (not inside or m.group(1) == fence):
            inside, fence = not inside, m.group(1)
            keep = inside and m.group(2).lower() not in NOT_SHELL
            continue
        if inside and keep:
            out.append((number, line))
    return out


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash continuations; each joined line keeps the number of its first line."""
    out, start, parts = [], None, []
    for number, line in lines:
        if start is None:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            parts.append(stripped[:-1])
            continue
        parts.append(stripped)
        out.append((start, " ".join(p.strip() for p in parts)))
        start, parts = None, []
    if parts:
        out.append((start, " ".join(p.strip() for p in parts)))
    return out


def chatvec_argv(line: str) -> tuple[str, ...] | None:
    """The arguments after `chatvec` when ``line`` runs chatvec, else None."""
    line = line.strip()
    for prefix in PREFIXES:
        if line.startswith(prefix):
            line = line[len(prefix) :]
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
        lexer.whitespace_split = True
        lexer.commenters = "#"  # a trailing `# comment` is prose
        words = list(lexer)
    except ValueError:
        return None
    if not words:
        return None
    if words[0] == "chatvec" and (len(words) == 1 or SUBCOMMAND.match(words[1])):
        start = 1
    else:
        start = next(
            (
                i + 2
                for i, w in enumerate(words[:-1])
                if w in HANDOFF and words[i + 1] in ("chatvec", ".venv/bin/chatvec")
            ),
            None,
        )
        if start is None:
            return None
    argv = []
    for word in words[start:]:
        if word in SHELL_STOP or re.match(r"^\d?>", word):
            break
        argv.append(word)
    return tuple(argv)


def doc_commands(path: Path, where: str | None = None) -> list[DocCommand]:
    """Every chatvec command in the fenced blocks of ``path``, named ``<where>:<line>``."""
    where = where or path.relative_to(ROOT).as_posix()
    found = []
    for number, line in logical_lines(fenced_lines(path.read_text(encoding="utf-8"))):
        argv = chatvec_argv(line)
        if argv is not None:
            found.append(DocCommand(f"{where}:{number}", argv))
    return found


def check(argv: tuple[str, ...]) -> None:
    """Parse and validate ``chatvec *argv`` as the CLI would, without running it."""
    # the group's own options (-v, -vv) come before the subcommand
    args = list(argv)
    while args and re.fullmatch(r"-v+|--verbose", args[0]):
        args.pop(0)
    if not args:
        raise click.UsageError("`chatvec` without a subcommand")
    name, args = args[0], args[1:]
    with click.Context(cli, info_name="chatvec") as ctx:
        cmd = cli.get_command(ctx, name)
        if cmd is None:
            raise click.UsageError(f"no such command {name!r} (commands: {', '.join(cli.list_commands(ctx))})")
        if "--help" in args or "-h" in args:
            return
        cmd.make_context(name, args, parent=ctx)


COMMANDS = [c for path in DOCS for c in doc_commands(path)]


def test_the_docs_have_commands_to_check():
    names = {c.argv[0] for c in COMMANDS if c.argv}
    # the tour's steps at least; a parser that finds nothing would pass every check below
    assert {"merge", "eval", "report", "sweep", "nightly"} <= names, names


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_is_accepted_by_the_cli(command: DocCommand):
    try:
        check(command.argv)
    except click.ClickException as exc:
        pytest.fail(f"{command.where}: `chatvec {shlex.join(command.argv)}`: {exc.format_message()}")


@pytest.mark.parametrize(
    "line, problem",
    [
        ("chatvec merge --cp CP --base B --chat C --ratoi 0.5 --out OUT", "No such option"),
        ("chatvec merge --cp CP --base B --chat C --method mean --out OUT", "Invalid value"),
        ("chatvec merge --cp CP --base B --chat C --density half --out OUT", "not a valid float"),
        ("chatvec eval --model cp=CP", "Missing option '--out'"),
        ("chatvec results a b", "unexpected extra argument"),
        ("chatvec frobnicate examples/paper.yaml", "no such command 'frobnicate'"),
    ],
)
def test_a_wrong_command_is_rejected(line: str, problem: str):
    argv = chatvec_argv(line)
    with pytest.raises(click.ClickException) as exc:
        check(argv)
    assert problem.lower() in exc.value.format_message().lower()


def test_the_reader_finds_fenced_commands_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Prose with `chatvec merge --nope`.\n\n"
        "    chatvec merge --indented-synopsis [--ratio R]\n\n"
        "```sh\n"
        "$ chatvec merge --cp CP --base B --chat C \\\n"
        "    --ratio 0.5 --out OUT   # a comment\n"
        ".venv/bin/chatvec results --root s3://bucket/x\n"
        "sed 's/a/b/' x > y\n"
        "ray job submit --address http://HEAD:8265 -- chatvec nightly s.yaml >> log 2>&1\n"
        "```\n\n"
        "```yaml\n"
        "chatvec merge --not-a-command-in-yaml\n"
        "```\n\n"
        "```\n"
        "chatvec CLI (cli/main.py)\n"
        "```\n",
        encoding="utf-8",
    )
    found = [(c.where, c.argv) for c in doc_commands(page, "page.md")]
    assert found == [
        ("page.md:6", ("merge", "--cp", "CP", "--base", "B", "--chat", "C", "--ratio", "0.5", "--out", "OUT")),
        ("page.md:8", ("results", "--root", "s3://bucket/x")),
        ("page.md:10", ("nightly", "s.yaml")),
    ]
