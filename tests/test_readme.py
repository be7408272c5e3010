"""The README and the pages under docs/ work as written.

* Every ``python`` block is executed (a fresh namespace, in a temporary folder that holds ``configs/``); one that
  imports an optional package that is not installed is skipped. Blocks of other languages (or none) are not run.
* Every command of a ``bash`` block is checked: ``jbptt run CONFIG ...`` through ``--print-config`` (the config and
  its overrides are loaded and validated, nothing is trained), ``jbptt sweep`` with the config of every point loaded and
  validated, ``jbptt compare`` with its config loaded and nothing run, other
  ``jbptt`` commands and ``python experiments/*.py`` scripts by parsing their arguments with their own parsers,
  ``pip install`` extras against ``pyproject.toml``, the test command against ``.ci/run``. Commands written inline
  in the prose (`` `jbptt ...` ``, `` `python experiments/...` ``) are parsed too.
* ``-m slow`` runs every block in full: python blocks marked slow, and every shell block as one bash script.
* Every relative link points at an existing file (and heading, for ``#anchors``); the pieces table names every
  module of ``jbptt/`` with what it imports; the configs table names every ``configs/*.yaml``.

A block preceded by ``<!-- not-run: reason -->`` is not run; one preceded by ``<!-- slow: reason -->`` runs only under
``-m slow`` (by default only its imports are executed).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import glob
import io
import os
import pathlib
import re
import runpy
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", ";", "&", "|"}


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    code: str
    marker: str | None  # "not-run", "slow" or None


def _blocks(page: pathlib.Path) -> list[Block]:
    lines = page.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = re.match(r"^<!--\s*(not-run|slow):\s*\S.*-->\s*$", lines[k]) if k >= 0 else None
        out.append(Block(str(page.relative_to(ROOT)), i + 1, m.group(1), "\n".join(lines[i + 1:j]),
                         mark.group(1) if mark else None))
        i = j + 1
    return out


BLOCKS = [b for page in PAGES for b in _blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell")]


def _id(b: Block) -> str:
    return f"{b.page}:{b.line}"


def _prose(page: pathlib.Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def _commands(code: str) -> list[list[str]]:
    """The simple commands of a shell snippet, each a token list without leading ``VAR=value`` assignments."""
    out = []
    for line in code.replace("\\\n", " ").split("\n"):
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        cmd: list[str] = []
        for tok in [*lex, ";"]:
            if tok in SEPARATORS:
                while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temporary working folder with the repository's configs/ and experiments/ linked in."""
    for name in ("configs", "experiments"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------- python blocks


def _exec(block: Block, code) -> None:
    """Executes ``code`` of ``block`` in a fresh namespace; an optional third-party package that is not installed
    skips the test (as ``pytest.importorskip`` would), a missing jbptt module fails it."""
    argv = sys.argv
    sys.argv = [block.page]  # run as a script with no arguments, not with pytest's
    try:
        exec(compile(code, block.page, "exec"), {"__name__": "__main__"})
    except ModuleNotFoundError as e:
        if (e.name or "jbptt").split(".")[0] == "jbptt":
            raise
        pytest.skip(f"optional package {e.name} is not installed")
    finally:
        sys.argv = argv


@pytest.mark.parametrize("block", [b for b in PYTHON if b.marker is None], ids=_id)
def test_python_block_runs(block, workdir):
    _exec(block, block.code)


@pytest.mark.parametrize("block", [b for b in PYTHON if b.marker == "slow"], ids=_id)
def test_slow_python_block_imports(block, workdir):
    """The fast part of a slow block: its import statements run."""
    tree = ast.parse(block.code)
    tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert tree.body, "a slow block without imports: nothing of it is checked by default"
    _exec(block, tree)


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in PYTHON if b.marker == "slow"], ids=_id)
def test_slow_python_block_runs(block, workdir):
    _exec(block, block.code)


# ------------------------------------------------------------------------------------------------- shell commands


class _Parsed(Exception):
    """Raised by a patched parse_args once the arguments parsed: nothing after parsing runs."""


@contextlib.contextmanager
def _stop_after_parsing():
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_intermixed_args")}

    def patched(name):
        def parse(self, *a, **k):
            originals[name](self, *a, **k)
            raise _Parsed

        return parse

    for name in originals:
        setattr(argparse.ArgumentParser, name, patched(name))
    try:
        yield
    finally:
        for name, f in originals.items():
            setattr(argparse.ArgumentParser, name, f)


def _parse_with_own_parser(main, argv) -> None:
    """Call ``main(argv)`` until its argument parser has parsed ``argv``; fail if the parser rejects it."""
    err = io.StringIO()
    with _stop_after_parsing(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except _Parsed:
            return
        except SystemExit as e:
            code = e.code
    assert code == 0, f"arguments rejected ({code}): {err.getvalue()}"


def _script(argv: list[str]) -> None:
    """``python experiments/x.py ARGS``: the script's own parser accepts ARGS."""
    path = ROOT / argv[0]
    assert path.is_file(), f"no such script: {argv[0]}"
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *argv[1:]]
    sys.path[:0] = [str(ROOT), str(path.parent)]
    try:
        _parse_with_own_parser(lambda _: runpy.run_path(str(path), run_name="__main__") or 0, None)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path


def _jbptt(argv: list[str], *, full: bool) -> None:
    """A ``jbptt`` command line. ``full``: validate its config too (block commands), else only parse (inline prose,
    which may show placeholders such as ``CONFIG`` or ``RUN_DIR``)."""
    from jbptt import cli

    command = argv[0] if argv else ""
    if command == "run" and full and "--resume" not in argv:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*argv, "--print-config"])
        assert code == 0 and out.getvalue().strip(), f"jbptt {shlex.join(argv)} --print-config: {err.getvalue()}"
    elif command == "sweep" and full:  # the axes parsed and every point's config loaded and validated
        from jbptt.experiment import config, sweep

        args = cli.parser().parse_args(argv)
        path, axes = sweep.read_spec(args.config, args.axes)
        grid, fixed = sweep.parse_axes(axes)
        for point in sweep.grid_points(grid):
            config.load_config(path, [*fixed, *point.overrides])
    elif command == "compare" and full:
        from jbptt.experiment import compare

        ran = []
        original = compare.run
        compare.run = lambda *a, **k: ran.append(a) or {"plots": []}  # the config is loaded, nothing is run
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                code = compare.main(argv[1:])
        finally:
            compare.run = original
        assert code == 0 and ran, f"jbptt {shlex.join(argv)} was refused"
    elif command == "compare":
        from jbptt.experiment import compare

        _parse_with_own_parser(compare.main, argv[1:])
    else:
        _parse_with_own_parser(cli.main, argv)


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _check_command(cmd: list[str], *, full: bool) -> None:
    if cmd[:2] == ["python", "-m"] and cmd[2:3] == ["jbptt"]:
        cmd = ["jbptt", *cmd[3:]]
    if cmd[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        cmd = cmd[2:]
    head = cmd[0]
    if head == "jbptt":
        _jbptt(cmd[1:], full=full)
    elif head in ("python", "python3") and cmd[1:3] == ["-m", "venv"]:
        pass
    elif head in (".", "source"):
        assert cmd[1:] == [".venv/bin/activate"], cmd
    elif head == "pip":
        assert cmd[1] == "install", cmd
        for arg in cmd[2:]:
            m = re.fullmatch(r"(\.|jbptt)(?:\[([\w,-]+)\])?", arg)
            if m is None:
                assert arg.startswith("-"), f"pip install of something other than jbptt: {arg}"
                continue
            missing = set((m.group(2) or "").split(",")) - {""} - _extras()
            assert not missing, f"pip install {arg}: no such extra in pyproject.toml: {missing}"
    elif head in ("python", "python3") and cmd[1:3] == ["-m", "pytest"]:
        ci = (ROOT / ".ci" / "run").read_text().split("\n")
        assert shlex.join(["python", *cmd[1:]]) in ci, f"{shlex.join(cmd)} is not the test command of .ci/run"
    elif head in ("python", "python3") and cmd[1].startswith("experiments/"):
        _script(cmd[1:])
    else:
        raise AssertionError(f"a command this test does not know how to check: {shlex.join(cmd)}")


@pytest.mark.parametrize("block", [b for b in SHELL if b.marker is None], ids=_id)
def test_shell_block_commands_work(block, workdir):
    commands = _commands(block.code)
    assert commands, "an empty shell block"
    for cmd in commands:
        _check_command(cmd, full=True)


INLINE = re.compile(r"`((?:PYTHONPATH=\S+\s+)?"
                    r"(?:jbptt\s|python3?\s+-m\s+jbptt\s|python3?\s+experiments/|pip\s+install\s)[^`]*)`")


def _inline_commands():
    for page in PAGES:
        for m in INLINE.finditer(_prose(page)):
            text = " ".join(m.group(1).split())
            yield pytest.param(text, id=f"{page.relative_to(ROOT)}: {text[:60]}")


@pytest.mark.parametrize("text", list(_inline_commands()))
def test_inline_command_parses(text, workdir):
    """Prose may name a subcommand alone (`jbptt sample`) or show a usage with ``[optional parts]`` and
    placeholders; what it shows must parse."""
    text = re.sub(r"\s\[[^]]*\]", "", text)
    for cmd in _commands(text):
        if cmd[0] == "jbptt" and len(cmd) == 2:
            cmd = [*cmd, "--help"]
        _check_command(cmd, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in SHELL if b.marker != "not-run"], ids=_id)
def test_shell_block_runs_in_full(block, workdir):
    """The whole block as one bash script (it trains: minutes to hours); setting up a venv, pip and the test suite
    itself are skipped."""
    (workdir / ".venv").symlink_to(pathlib.Path(sys.prefix))
    prelude = "\n".join([
        'python3() { if [ "${1-}" = -m ] && [ "${2-}" = venv ]; then return 0; fi; command python3 "$@"; }',
        'python() { if [ "${1-}" = -m ] && [ "${2-}" = pytest ]; then return 0; fi; command python "$@"; }',
        "pip() { return 0; }",
        "set -euo pipefail",
    ])
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-c", f"{prelude}\n{block.code}\nwait"], cwd=workdir, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------ links and tables


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", _prose(page), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no such heading")
    assert not bad, bad


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.split("\n") if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def _top_level_imports() -> dict[str, set[str]]:
    """For each top-level module or package of jbptt/, the other top-level jbptt modules it imports."""
    deps: dict[str, set[str]] = {}
    for path in (ROOT / "jbptt").rglob("*.py"):
        rel = path.relative_to(ROOT / "jbptt").with_suffix("").parts
        top = rel[0]
        package = ["jbptt", *rel[:-1]]
        deps.setdefault(top, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [base] + ([f"{base}.{a.name}" for a in node.names] if base == "jbptt" else [])
            deps[top] |= {n.split(".")[1] for n in names if n.startswith("jbptt.")} - {top}
    return {top: found & set(deps) for top, found in deps.items()}  # modules only (not `from jbptt import x`)


def test_pieces_table_names_every_module_and_its_imports():
    rows = _table((ROOT / "README.md").read_text(), "## The pieces")
    listed = {}
    for row in rows:
        m = re.fullmatch(r"`jbptt\.(\w+)`", row[1])
        assert m, f"a pieces row without a `jbptt.module`: {row}"
        listed[m.group(1)] = row[3]
    deps = _top_level_imports()
    modules = set(deps) - {"__init__", "__main__"}
    assert set(listed) == modules, f"in jbptt/ but not in the table: {modules - set(listed)}; " \
                                   f"in the table but not in jbptt/: {set(listed) - modules}"
    for name, column in listed.items():
        if column in ("the library", "everything above"):
            continue
        allowed = set() if column == "—" else {c.strip() for c in column.split(",")}
        assert deps[name] <= allowed, f"jbptt.{name} imports {sorted(deps[name] - allowed)} too (table: {column})"


def test_configs_table_names_every_config():
    rows = _table((ROOT / "README.md").read_text(), "## Configs")
    listed = {re.fullmatch(r"`([\w.-]+)`", row[0]).group(1) for row in rows}
    shipped = {os.path.basename(p) for p in glob.glob(str(ROOT / "configs" / "*.yaml"))}
    assert listed == shipped, f"missing from the table: {shipped - listed}; not in configs/: {listed - shipped}"
