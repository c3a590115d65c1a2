"""`tether completion`: the shells complete every command and option the CLI has."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tether.coordinator.cli import build_parser
from tether.coordinator.cli.completion import SHELLS, _commands, _options


def script(shell: str) -> str:
    res = subprocess.run([sys.executable, "-m", "tether.coordinator.cli", "completion", shell],
                         capture_output=True, text=True, timeout=60, check=True)
    return res.stdout


def complete(words: list[str]) -> list[str]:
    """What bash offers for the last word of ``words``, with the real completion loaded."""
    code = (f"source <({sys.executable} -m tether.coordinator.cli completion bash)\n"
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            "_tether; printf '%s\\n' \"${COMPREPLY[@]}\"")
    res = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [w for w in res.stdout.splitlines() if w]


def test_bash_completes_commands_options_and_choices() -> None:
    assert complete(["tether", "sto"]) == ["stop"]
    assert "spawn" in complete(["tether", "--coordinator", "h:1", "sp"])
    assert complete(["tether", "stop", "--gra"]) == ["--grace"]
    assert complete(["tether", "spawn", "--orphan-policy", ""]) == ["kill", "keep"]
    assert "--retain-stopped" in complete(["tether", "serve", "--re"])


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_every_command_and_option_is_in_the_script(shell: str) -> None:
    text = script(shell)
    parser = build_parser()
    for name, sp in _commands(parser).items():
        assert name in text
        for option in _options(sp):
            assert option.removeprefix("--" if shell == "fish" else "") in text, (name, option)
