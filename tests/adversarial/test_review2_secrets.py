"""What the second hostile review found about secrets and who may read what, each as the
user would meet it (ports of tests/review2 on the review2 branch). Every test here failed
before its fix:

* version_file_leak: a version file planted as a link to a root-only secret (tether's own
  token file) was read as root and echoed into the group's record; one planted in /tmp
  failed every spawn below it.
* status_leak: /status on the metrics listener gave anyone session names, labels, agent
  addresses and a check URL's password; a non-loopback metrics listener went unwarned.
* token_owner: a root daemon took a 0600 token file another user owns (and may rewrite).
* open_serve_local_root: a root daemon without credentials (every local user may run
  commands as root through it) said so only at INFO.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.common import require, require_root
from tests.plugins.processes import (
    Daemon,
    start_daemon,
    stop_daemon,
)
from tether.agent.toolchains import Jenv, Nvm, Pyenv, ToolchainMissing, ToolVersions
from tether.client.spec import build_spec
from tether.core.model import GroupSpec

NOBODY = "nobody"


def nobody() -> pwd.struct_passwd:
    require_root()
    try:
        return pwd.getpwnam(NOBODY)
    except KeyError:
        require(False, "needs the user nobody")
        raise


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory under /tmp that every user may enter (pytest's tmp_path is under one
    only root may enter), 0755, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="tether-r2-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def layouts(root: Path) -> dict[str, Any]:
    """Each toolchain plugin over a minimal layout of its tool, with its version file."""
    (root / "pyenv" / "versions" / "3.12.1" / "bin").mkdir(parents=True)
    (root / "jenv" / "versions" / "17" / "bin").mkdir(parents=True)
    (root / "asdf" / "installs" / "python" / "3.12.1" / "bin").mkdir(parents=True)
    node = root / "nvm" / "versions" / "node" / "v20.11.1" / "bin"
    node.mkdir(parents=True)
    (node / "node").write_text("")
    return {".python-version": Pyenv(root / "pyenv"), ".java-version": Jenv(root / "jenv"),
            ".tool-versions": ToolVersions(root / "asdf"), ".nvmrc": Nvm(root / "nvm")}


def enhance(plugin: Any, spec: GroupSpec) -> GroupSpec:
    out: GroupSpec = plugin.enhance(spec)
    return out


# ------------------------------------------------------------------ version_file_leak


@pytest.mark.parametrize("name", [".python-version", ".java-version", ".tool-versions",
                                  ".nvmrc"])
@pytest.mark.parametrize("secret", ["TOKEN admin\n", "TOKEN\n"])
def test_a_version_file_linked_to_a_secret_is_never_echoed(tmp_path: Path, name: str,
                                                           secret: str) -> None:
    """A token passes the version alphabet; the not-installed message used to repeat it
    (asdf the whole line, nvm a bare token)."""
    plugin = layouts(tmp_path / "tools")[name]
    token = "adm" + secrets.token_hex(16)
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    (vault / "tokens").write_text(secret.replace("TOKEN", token))
    (vault / "tokens").chmod(0o600)
    project = tmp_path / "proj"
    project.mkdir()
    (project / name).symlink_to(vault / "tokens")
    spec = build_spec(["true"], cwd=str(project))
    if name == ".tool-versions" and " " not in secret.strip():
        assert enhance(plugin, spec) == spec, "a line without a version names nothing"
        return
    with pytest.raises(ToolchainMissing) as caught:
        enhance(plugin, spec)
    message = caught.value.message
    assert token not in message and "admin" not in message, message
    assert str(project / name) in message, "the message names the file"


@pytest.mark.parametrize("sticky", [True, False])
@pytest.mark.parametrize("name", [".python-version", ".java-version", ".tool-versions",
                                  ".nvmrc"])
def test_a_version_file_in_a_directory_anyone_may_write_is_not_read(
        tmp_path: Path, name: str, sticky: bool) -> None:
    """Like /tmp: whatever is dropped there neither applies nor fails spawns below it."""
    plugin = layouts(tmp_path / "tools")[name]
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777 if sticky else 0o777)
    (shared / name).write_text("python 9.9\n" if name == ".tool-versions" else "9.9\n")
    project = shared / "proj"
    project.mkdir()
    spec = build_spec(["true"], cwd=str(project))
    assert not plugin.applies(spec)
    assert enhance(plugin, spec) == spec


def test_a_version_file_of_another_user_is_refused_naming_its_owner(tmp_path: Path) -> None:
    other = nobody()
    plugin = layouts(tmp_path / "tools")[".python-version"]
    parent = tmp_path / "parent"
    project = parent / "proj"
    project.mkdir(parents=True)
    planted = parent / ".python-version"
    planted.write_text("3.12.1\n")  # installed: it used to apply
    os.chown(planted, other.pw_uid, other.pw_gid)
    with pytest.raises(ToolchainMissing) as caught:
        enhance(plugin, build_spec(["true"], cwd=str(project)))
    assert str(planted) in caught.value.message and NOBODY in caught.value.message
    # A link made by another user, to a file root owns, is refused the same way.
    planted.unlink()
    target = tmp_path / "root-owned"
    target.write_text("3.12.1\n")
    planted.symlink_to(target)
    os.lchown(planted, other.pw_uid, other.pw_gid)
    with pytest.raises(ToolchainMissing, match="symbolic link made by nobody"):
        enhance(plugin, build_spec(["true"], cwd=str(project)))
    # The working directory's owner is trusted: their project, their version file.
    os.chown(project, other.pw_uid, other.pw_gid)
    os.lchown(planted, 0, 0)
    (project / ".python-version").write_text("3.12.1\n")
    os.chown(project / ".python-version", other.pw_uid, other.pw_gid)
    out = enhance(plugin, build_spec(["true"], cwd=str(project)))
    assert out.env["PATH"].startswith(str(tmp_path / "tools/pyenv/versions/3.12.1/bin"))


def test_the_group_user_must_be_able_to_read_the_version_file(public: Path) -> None:
    nobody()
    plugin = layouts(public / "tools")[".python-version"]
    project = public / "proj"
    project.mkdir()
    project.chmod(0o755)
    version = project / ".python-version"
    version.write_text("3.12.1\n")
    version.chmod(0o600)  # root's only: nobody could not read it
    spec = build_spec(["true"], cwd=str(project), user=NOBODY)
    with pytest.raises(ToolchainMissing) as caught:
        enhance(plugin, spec)
    assert str(version) in caught.value.message and NOBODY in caught.value.message
    version.chmod(0o644)
    assert enhance(plugin, spec).env["PATH"].startswith(
        str(public / "tools/pyenv/versions/3.12.1/bin"))
    project.chmod(0o700)  # readable, but behind a directory nobody may not search
    with pytest.raises(ToolchainMissing, match="may not read it"):
        enhance(plugin, spec)


def test_an_oversized_version_file_is_refused_not_cut(tmp_path: Path) -> None:
    plugin = layouts(tmp_path / "tools")[".nvmrc"]
    (tmp_path / ".nvmrc").write_text("20\n" + "#" * 5000 + "\n")
    with pytest.raises(ToolchainMissing, match="larger than 4096 bytes"):
        enhance(plugin, build_spec(["true"], cwd=str(tmp_path)))


def tether_as(d: Daemon, token: Path, *args: str) -> Any:
    return d.cli("--token-file", str(token), *args)


def test_a_link_planted_in_a_shared_parent_leaks_nothing_to_a_reader(public: Path) -> None:
    """The review's end-to-end case: nobody links /tmp-like/.python-version to the daemon's
    own token file; an operator spawns below it as nobody; a reader shows the session."""
    other = nobody()
    pyenv_root = public / "pyenv"
    (pyenv_root / "versions" / "3.12.1" / "bin").mkdir(parents=True)
    vault = public / "vault"
    vault.mkdir(mode=0o700)
    admin = "adm" + secrets.token_hex(20)
    roles = {"operator": "op" + secrets.token_hex(20), "reader": "rd" + secrets.token_hex(20)}
    tokens = vault / "tokens"
    tokens.write_text(f"{admin} admin\n" + "".join(f"{t} {r}\n" for r, t in roles.items()))
    tokens.chmod(0o600)
    files = {}
    for role, token in roles.items():
        files[role] = vault / f"{role}.tok"
        files[role].write_text(token + "\n")
        files[role].chmod(0o600)
    shared = public / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / ".python-version").symlink_to(tokens)
    os.lchown(shared / ".python-version", other.pw_uid, other.pw_gid)
    project = shared / "proj"
    project.mkdir()
    os.chown(project, other.pw_uid, other.pw_gid)
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(public / "st"),
                               "--agent-name", f"r2v-{public.name[-6:]}", "--token-file",
                               str(tokens)], public / "st",
                     env={"PYENV_ROOT": str(pyenv_root)})
    try:
        res = tether_as(d, files["operator"], "spawn", "--session", "ed", "--user", NOBODY,
                        "--cwd", str(project), "--", "sleep", "30")
        assert res.returncode == 0, res.stderr
        assert admin not in res.stderr
        shown = tether_as(d, files["reader"], "show", "ed", "-o", "json")
        assert shown.returncode == 0, shown.stderr
        assert admin not in shown.stdout
        group = json.loads(shown.stdout)["groups"][0]
        assert group["state"] == "running"
        assert not group.get("context", {}).get("plugins"), "the planted file was not used"
    finally:
        tether_as(d, files["operator"], "stop", "ed")
        stop_daemon(d)
