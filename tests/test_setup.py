"""Issue 19: README's two commands work on a stock machine with the distribution's python3.

``test_readme_main_command_on_a_stock_machine`` reads README's main command out of
README.md itself (the first line of the first ```sh block under "## Quickstart"), so the
two cannot drift, and runs it as printed, through bash, in a fresh clone of this
repository's HEAD (CI tests commits: uncommitted edits are not in a clone), with a fresh,
empty HOME and only the distribution's directories on PATH (no pyenv, no venv, no
~/.local/bin). ``tether serve`` must come up on its default address and answer there,
and SIGTERM must stop it with status 0.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.plugins.common import require

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# A stock Debian 12 / Ubuntu 24.04 login PATH, without the user's own ~/.local/bin.
DISTRO_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_ADDRESS = ("127.0.0.1", 7400)
# How a user of this machine reaches the package registries (mirror, certificates, proxy):
# kept, as a new user would have them from /etc too. Nothing else of this environment is.
PASSED_ON = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST",
             "PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_PROXY",
             "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# A guard against a hang (no network, a stuck daemon), not a performance claim.
HANG_GUARD = 600.0


def quickstart_commands() -> tuple[str, str]:
    """README's two commands: the first two lines of Quickstart's first ```sh block."""
    section = re.search(r"^## Quickstart\n(.*?)^## ", README.read_text(), re.S | re.M)
    assert section, "README.md has no '## Quickstart' section"
    block = re.search(r"^```sh\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "README's Quickstart has no ```sh block"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) >= 2, f"README's Quickstart block should hold two commands: {lines}"
    return lines[0], lines[1]


def and_list(command: str) -> list[list[str]]:
    """`a && b && c # comment` -> [[a...], [b...], [c...]]."""
    words = shlex.split(command, comments=True)
    parts: list[list[str]] = [[]]
    for word in words:
        if word == "&&":
            parts.append([])
        else:
            parts[-1].append(word)
    return parts


def stock_env(home: Path) -> dict[str, str]:
    env = {"PATH": DISTRO_PATH, "HOME": str(home), "LANG": "C.UTF-8",
           # pip shows the build backend's output (where setuptools prints its
           # deprecations) only when verbose; the command itself is unchanged.
           "PIP_VERBOSE": "1"}
    env.update({k: os.environ[k] for k in PASSED_ON if k in os.environ})
    return env


def git(*args: str, cwd: Path = REPO) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"git {' '.join(args)}: {res.stderr}"
    return res.stdout.strip()


def test_ci_runs_readme_test_command() -> None:
    """.ci/run ends in exactly README's test command (after cd to the clone's root)."""
    _, test_command = quickstart_commands()
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert shlex.split(lines[-1]) == ["exec", *shlex.split(test_command, comments=True)]
    assert 'cd "$(dirname "$0")/.."' in lines


def test_venvs_are_ignored_by_git() -> None:
    require((REPO / ".git").exists(), "needs a git checkout of the repository")
    main, _ = quickstart_commands()
    venv = Path(and_list(main)[-1][0]).parts[0]
    test_venv = re.search(r"^TEST_VENV=(\S+)$", (REPO / ".ci" / "test-env.sh").read_text(), re.M)
    assert test_venv, ".ci/test-env.sh does not set TEST_VENV"
    for path in (f"{venv}/bin/python", f"{test_venv.group(1)}/bin/python"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, timeout=60)
        assert res.returncode == 0, f"{path} is not ignored by .gitignore"


def port_is_free(address: tuple[str, int]) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def find_serve(root: psutil.Process, argv: list[str]) -> psutil.Process:
    """The `tether serve` process: bash itself if it exec'd the last command, else its child.
    A script's argv is [interpreter, script as typed, args...]."""
    for p in [root, *root.children(recursive=True)]:
        try:
            if p.cmdline()[-len(argv):] == argv:
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process running {argv} under the command's shell")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_main_command_on_a_stock_machine(tmp_path: Path) -> None:
    require((REPO / ".git").exists(), "needs a git checkout of the repository (it clones HEAD)")
    main, _ = quickstart_commands()
    steps = and_list(main)
    serve_argv = steps[-1]
    assert Path(serve_argv[0]).name == "tether" and serve_argv[1:] == ["serve"], (
        f"README's main command should end by running `tether serve`: {main!r}")

    home = tmp_path / "home of a new user"  # a space in HOME, as some users have
    home.mkdir()
    env = stock_env(home)
    prefix = subprocess.run(["python3", "-c", "import sys; print(sys.prefix)"], env=env,
                            capture_output=True, text=True, timeout=60)
    require(prefix.returncode == 0 and prefix.stdout.strip() == "/usr",
            f"needs the distribution's python3 first on {DISTRO_PATH} "
            f"(found prefix {prefix.stdout.strip()!r}: a python3 in /usr/local?) {prefix.stderr}")
    if not port_is_free(DEFAULT_ADDRESS):
        pytest.fail(f"{DEFAULT_ADDRESS[0]}:{DEFAULT_ADDRESS[1]} is taken on this machine: README's "
                    "`tether serve` listens there by default, so this test needs it free "
                    "(`ss -ltnp 'sport = 7400'` shows who holds it)", pytrace=False)

    clone = tmp_path / "a clone" / "tether"
    git("clone", "--quiet", "--no-checkout", str(REPO), str(clone))
    git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach",
        git("rev-parse", "HEAD"), cwd=clone)

    proc = subprocess.Popen(["bash", "-c", main], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[str] = []
    up = threading.Event()  # set on the "listening" line, or when the output ends

    def read() -> None:
        try:
            for line in stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("tether serve listening on "):
                    up.set()
        except (OSError, ValueError):  # closed under us at teardown
            pass
        finally:
            up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def tail() -> str:
        return "\n".join(lines[-60:])

    try:
        up.wait(HANG_GUARD)
        listening = [line for line in lines if line.startswith("tether serve listening on ")]
        assert listening, (f"README's main command did not bring `tether serve` up "
                           f"(exit status {proc.poll()}):\n{tail()}")

        # pip's part of the output: no deprecation from pip or the build backend.
        done = [i for i, line in enumerate(lines) if line.startswith("Successfully installed ")]
        assert done, f"no 'Successfully installed' line from pip:\n{tail()}"
        deprecations = [line for line in lines[:done[-1] + 1] if "deprecat" in line.lower()]
        assert not deprecations, "the install printed deprecation warnings:\n" + "\n".join(deprecations)

        host, port = DEFAULT_ADDRESS
        assert listening[0].startswith(f"tether serve listening on {host}:{port} "), listening[0]
        assert f"state in {home}/.local/state/tether" in listening[0], listening[0]

        with grpc.insecure_channel(f"{host}:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # The CLI the install put in the clone's venv talks to it on the default address.
        sessions = subprocess.run([str(clone / serve_argv[0]), "sessions"], cwd=clone, env=env,
                                  capture_output=True, text=True, timeout=120)
        assert sessions.returncode == 0, sessions.stdout + sessions.stderr

        serve = find_serve(psutil.Process(proc.pid), serve_argv)
        serve.send_signal(signal.SIGTERM)
        rc = proc.wait(HANG_GUARD)
        reader.join(30)
        assert rc == 0, f"`tether serve` exited {rc} after SIGTERM:\n{tail()}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
        reader.join(30)
        stdout.close()
