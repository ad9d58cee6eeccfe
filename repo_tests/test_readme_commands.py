"""Every command in the READMEs' bash blocks is checked against the real CLI it calls, and the cheap ones run.

A README command that names a subcommand or flag the CLI does not have fails a user on the first copy-paste,
so each one is parsed here: its program (a console script or `python -m module`), its subcommands (followed
through each level's `--help`) and every `--flag` it uses must exist. Commands that need no data, model or
GPU are run as written, in a scratch folder. `--help` is asked of each program's own `main` in this process
(one import per package instead of one interpreter per command).
"""

import contextlib
import functools
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = sorted([ROOT / "README.md", *ROOT.glob("assignment*/README.md")])
SCRIPTS = {"cs336-basics": "cs336_basics", "cs336-systems": "cs336_systems", "cs336-scaling": "cs336_scaling",
           "cs336-data": "cs336_data", "cs336-align": "cs336_alignment"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(readme: Path) -> list[tuple[str, list[str]]]:
    """(source line, tokens) for every cs336 command in the file's bash blocks (continuations joined,
    comments, `uv run`, environment assignments and `cd ... &&` prefixes dropped)."""
    found = []
    for block in bash_blocks(readme.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line):
                try:
                    tokens = shlex.split(part, comments=True)
                except ValueError:
                    continue
                while tokens and (re.fullmatch(r"[A-Z_]+=\S*", tokens[0]) or tokens[0] in ("uv", "run", "export")):
                    tokens = tokens[1:]
                if tokens and (tokens[0] in SCRIPTS or (tokens[0].startswith("python") and tokens[1:2] == ["-m"]
                                                        and tokens[2].startswith("cs336_"))):
                    found.append((part.strip(), tokens))
    return found


ALL = [(readme, line, tokens) for readme in READMES for line, tokens in commands(readme)]


def program(tokens: list[str]) -> tuple[str, list[str]]:
    """(the module whose `main(argv)` runs the program, the remaining arguments)."""
    if tokens[0] in SCRIPTS:
        [script] = [e for e in entry_points(group="console_scripts") if e.name == tokens[0]]
        return script.value.split(":")[0], tokens[1:]
    module = tokens[2]
    if hasattr(importlib.import_module(module), "__path__"):  # a package runs its __main__
        module += ".__main__"
    return module, tokens[3:]


@functools.cache
def help_text(module: str, path: tuple[str, ...]) -> str:
    """What `<program> <path...> --help` prints, from the program's own `main` in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main([*path, "--help"])
    assert exited.value.code in (0, None), f"{module} {' '.join(path)} --help exited with {exited.value.code}"
    return out.getvalue()


def subcommands(help_output: str) -> set[str]:
    """The choices of a subparser (or a positional with choices), listed as `  {a,b,c}` among the positionals."""
    match = re.search(r"^  \{([\w,-]+)\}", help_output, flags=re.M)
    return set(match.group(1).split(",")) if match else set()


@pytest.mark.parametrize("readme, line, tokens", ALL, ids=[f"{r.parent.name}:{line[:60]}" for r, line, _ in ALL])
def test_readme_command_names_real_subcommands_and_flags(readme, line, tokens):
    module, rest = program(tokens)
    path: tuple[str, ...] = ()
    text = help_text(module, path)
    while rest and rest[0] in subcommands(text):
        path, rest = (*path, rest[0]), rest[1:]
        previous, text = text, help_text(module, path)
        if text == previous:  # a positional with choices, not a subparser: the rest are its arguments
            break
    else:
        assert not (subcommands(text) and rest and not rest[0].startswith("-")), \
            f"{readme.name}: `{line}`: {rest[0]!r} is not one of {sorted(subcommands(text))}"
    for flag in (t.split("=")[0] for t in rest if t.startswith("--")):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", text, flags=re.M), \
            f"{readme.name}: `{line}` uses {flag}, which `{tokens[0]} {' '.join(path)}` does not have"


def test_every_readme_has_commands_that_were_checked():
    assert {r for r, _, _ in ALL} >= {ROOT / "README.md", ROOT / "assignment5-alignment" / "README.md"}
    assert len(ALL) > 40


CHEAP = [
    ("assignment5-alignment/README.md", "cs336-align grade"),
    ("assignment5-alignment/README.md", "cs336-align prompt r1_zero"),
]


@pytest.mark.parametrize("readme_name, prefix", CHEAP)
def test_cheap_readme_commands_run_as_written(readme_name, prefix, tmp_path):
    matches = [tokens for readme, line, tokens in ALL
               if readme == ROOT / readme_name and " ".join(tokens).startswith(prefix)]
    assert matches, f"{readme_name} no longer has a `{prefix}` command"
    for tokens in matches:
        module, rest = program(tokens)
        runner = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        result = subprocess.run([sys.executable, "-c", runner, *rest], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, env=env)
        assert result.returncode == 0, f"`{' '.join(tokens)}` failed:\n{result.stderr[-2000:]}"
        assert result.stdout.strip()
