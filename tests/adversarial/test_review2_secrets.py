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
import stat
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.common import require, require_root
from tests.plugins.processes import (
    Daemon,
    free_port,
    make_authority,
    start_daemon,
    stop_daemon,
    wait_until,
)
from tether.agent.toolchains import Jenv, Nvm, Pyenv, ToolchainMissing, ToolVersions
from tether.client.spec import build_spec
from tether.core.model import FailureClass, GroupSpec, GroupState
from tether.rpc.auth import load_tokens
from tether.rpc.security import SecurityConfigError

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


# ------------------------------------------------------------------ status_leak


HEALTH_SERVER = """
import base64, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

EXPECTED = "Basic " + base64.b64encode("svc:p@ss word".encode()).decode()


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Authorization") == EXPECTED and self.path == sys.argv[2]
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


async def test_http_probes_send_url_credentials_as_basic_auth_and_never_repeat_them(
        tmp_path: Path) -> None:
    """The group answers 200 only to the right Basic credentials and the full query."""
    script = tmp_path / "health.py"
    script.write_text(HEALTH_SERVER)
    auth, signallers = await make_authority(f"r2b-{os.getpid()}-{tmp_path.name[-6:]}")
    try:
        port = free_port()
        good = f"http://svc:p%40ss%20word@127.0.0.1:{port}/ready?key=qs-secret"
        view = await auth.spawn(build_spec(
            [sys.executable, str(script), str(port), "/ready?key=qs-secret"], ready=good,
            start_timeout=20))
        assert view.state is GroupState.RUNNING, view.exit
        port = free_port()
        bad = f"http://svc:wrong-pw@127.0.0.1:{port}/ready?key=qs-secret"
        view = await auth.spawn(build_spec(
            [sys.executable, str(script), str(port), "/ready?key=qs-secret"], ready=bad,
            start_timeout=3))
        assert view.exit is not None
        assert view.exit.failure is FailureClass.READINESS_FAILED, view.exit
        message = view.exit.message
        assert "401" in message
        assert "wrong-pw" not in message and "qs-secret" not in message, message
        assert f"http://127.0.0.1:{port}/ready" in message, message
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def test_status_tells_an_anonymous_reader_counts_not_names_nor_secrets(tmp_path: Path) -> None:
    admin = "ad" + secrets.token_hex(20)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{admin} admin\n")
    tokens.chmod(0o600)
    mport = free_port()
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"r2s-{tmp_path.name[-6:]}", "--token-file",
                               str(tokens), "--metrics-listen", f"127.0.0.1:{mport}"],
                     tmp_path / "st")
    d.env["TETHER_TOKEN_FILE"] = str(tokens)
    try:
        pw = "pw" + secrets.token_hex(6)
        gid = d.cli("spawn", "--session", "payments-prod", "--label", "webhook", "--live",
                    f"http://svc:{pw}@127.0.0.1:1/health?sig=qs{pw}", "--live-interval", "0.2",
                    "--live-failures", "1", "--", "sleep", "60", check=True).stdout.strip()
        wait_until(lambda: json.loads(get(f"http://127.0.0.1:{mport}/status"))["unhealthy"],
                   30, "the group to be unhealthy")
        body = get(f"http://127.0.0.1:{mport}/status")
        for secret in (pw, "payments-prod", "webhook", d.address, "svc:"):
            assert secret not in body, (secret, body)
        status = json.loads(body)
        assert [u["group_id"] for u in status["unhealthy"]] == [gid]
        assert status["unhealthy"][0]["health"].startswith("GET http://127.0.0.1:1/health:")
        assert status["groups"]["running"] == 1 and status["sessions"]["active"] == 1
        assert status["agents"] == {"up": 1, "unreachable": 0}
        # Records and logs carry the check's detail without the URL's secrets too.
        shown = d.json("show", "payments-prod")["groups"][0]
        assert shown["unhealthy"] and pw not in shown["health"], shown["health"]
        assert pw not in d.log()
    finally:
        d.cli("stop", "payments-prod")
        stop_daemon(d)


def test_a_metrics_listener_on_a_public_address_is_warned_about(tmp_path: Path) -> None:
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"r2m-{tmp_path.name[-6:]}", "--metrics-listen",
                               f"0.0.0.0:{free_port()}"], tmp_path / "st")
    try:
        warned = [line for line in d.log().splitlines()
                  if "WARNING" in line and "/status" in line]
        assert warned and "0.0.0.0" in warned[0] and "/metrics" in warned[0], d.log()
    finally:
        stop_daemon(d)


# ------------------------------------------------------------------ token_owner


def test_a_daemon_refuses_a_token_file_another_user_owns(tmp_path: Path) -> None:
    other = nobody()
    f = tmp_path / "tokens"
    f.write_text(f"{secrets.token_hex(20)} admin\n")
    f.chmod(0o600)
    os.chown(f, other.pw_uid, other.pw_gid)
    with pytest.raises(SecurityConfigError) as caught:
        load_tokens(str(f))
    assert str(f) in str(caught.value) and NOBODY in str(caught.value)
    assert "chown" in str(caught.value)


@pytest.mark.parametrize(("mode", "refused"), [(0o777, True), (0o1777, False), (0o755, False)])
def test_a_daemon_refuses_a_token_file_others_could_replace(tmp_path: Path, mode: int,
                                                            refused: bool) -> None:
    """In a directory others may write without the sticky bit, anyone may swap the file."""
    d = tmp_path / "dir"
    d.mkdir()
    d.chmod(mode)
    f = d / "tokens"
    f.write_text(f"{secrets.token_hex(20)} admin\n")
    f.chmod(0o600)
    if refused:
        with pytest.raises(SecurityConfigError, match="other users may write"):
            load_tokens(str(f))
    else:
        assert len(load_tokens(str(f))) == 1
    assert stat.S_IMODE(d.stat().st_mode) == mode


# ------------------------------------------------------------------ open_serve_local_root


def test_a_root_daemon_without_credentials_warns_that_every_local_user_is_root(
        tmp_path: Path) -> None:
    require_root()
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"r2o-{tmp_path.name[-6:]}"], tmp_path / "st")
    try:
        warned = [line for line in d.log().splitlines() if "WITHOUT AUTHENTICATION" in line]
        assert warned and "WARNING" in warned[0], d.log()
        assert "any local user can run commands as root" in warned[0].lower(), warned[0]
        assert "--token-file" in warned[0] and ":0 " not in warned[0], "the real port"
    finally:
        stop_daemon(d)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{secrets.token_hex(20)} admin\n")
    tokens.chmod(0o600)
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st2"),
                               "--agent-name", f"r2p-{tmp_path.name[-6:]}", "--token-file",
                               str(tokens)], tmp_path / "st2")
    try:
        assert "WITHOUT AUTHENTICATION" not in d.log()
    finally:
        stop_daemon(d)
