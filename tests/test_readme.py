"""Every snippet in the README works as pasted: each Python block runs (against
MockUpstream instead of the providers' APIs), and each `keyfailover` command line
in a shell block parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from keyfailover import cli
from keyfailover.testing import MockUpstream

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[tuple[int, str]]:
    text = README.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(2))
        for m in BLOCK.finditer(text)
        if m.group(1) == language
    ]


PYTHON = blocks("python")


def test_the_readme_has_snippets() -> None:
    assert len(PYTHON) >= 6
    assert blocks("sh")


@pytest.mark.parametrize(("line", "code"), PYTHON, ids=[f"line {n}" for n, _ in PYTHON])
def test_python_snippet_runs(line: int, code: str, mock_upstream: MockUpstream) -> None:
    for public in ("https://api.anthropic.com", "https://api.openai.com"):
        code = code.replace(public, mock_upstream.url)
    namespace: dict[str, Any] = {"__name__": f"readme_line_{line}"}
    exec(compile(code, f"README.md, line {line}", "exec"), namespace)
    for name, value in namespace.items():
        if name.startswith("test_") and callable(value):
            value(mock_upstream)  # a test shown in the README runs as one


def command_lines(script: str) -> list[list[str]]:
    """The `keyfailover ...` commands of a shell block, as argv lists."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;", line.split("#", 1)[0]):
            words = shlex.split(part)
            while words and "=" in words[0]:  # VAR=value prefixes
                words.pop(0)
            if words[:1] == ["keyfailover"]:
                commands.append(words[1:])
    return commands


SHELL_COMMANDS = [argv for _, script in blocks("sh") for argv in command_lines(script)]


@pytest.mark.parametrize("argv", SHELL_COMMANDS, ids=" ".join)
def test_shell_commands_parse(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.command == argv[0]
