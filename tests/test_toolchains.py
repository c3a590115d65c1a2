"""Toolchain plugins against the tools' real directory layouts.

pyenv is installed on the build machine and used as it is (its own ``pyenv
version-name`` is the oracle for version resolution). nvm and jenv are built in
their documented layouts with the machine's real ``node`` and JDK linked in, and
their resolution rules are checked as nvm's and jenv's documentation and scripts
state them. Groups really run: what the program sees on PATH proves the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.plugins.common import require
from tests.plugins.processes import Daemon, make_authority, start_daemon, stop_daemon
from tether.agent import plugins as registry
from tether.agent.authority import Authority
from tether.agent.hooks import Hooks
from tether.agent.plugins import PluginContext, Plugins, describe_changes
from tether.agent.toolchains import Jenv, Nvm, Pyenv, ToolchainMissing, ToolVersions
from tether.client.spec import build_spec
from tether.core.model import ExitReason, FailureClass, GroupSpec, GroupState

NODE = shutil.which("node")
JAVA = shutil.which("java")


def pyenv_root() -> Path:
    exe = shutil.which("pyenv") or os.path.expanduser("~/.pyenv/bin/pyenv")
    require(os.path.exists(exe), "needs pyenv (it is on the build machine at ~/.pyenv)")
    out = subprocess.run([exe, "root"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def pyenv_says(root: Path, cwd: Path, version: str = "") -> str:
    """What pyenv itself resolves in ``cwd`` (``pyenv version-name``), optionally with
    ``PYENV_VERSION`` set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYENV_VERSION")}
    env["PYENV_ROOT"] = str(root)
    if version:
        env["PYENV_VERSION"] = version
    out = subprocess.run([str(root / "bin" / "pyenv"), "version-name"], cwd=cwd, env=env,
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "not installed"


def nvm_layout(root: Path, versions: list[str]) -> Path:
    """$NVM_DIR as `nvm install` leaves it: versions/node/vX.Y.Z/bin/node (the machine's
    real node linked in), alias files, LTS aliases as `nvm ls-remote --lts` writes them."""
    require(NODE is not None, "needs node on PATH")
    assert NODE is not None
    for v in versions:
        bin_dir = root / "versions" / "node" / v / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "node").symlink_to(NODE)
    alias = root / "alias"
    (alias / "lts").mkdir(parents=True)
    (alias / "default").write_text("20\n")
    (alias / "lts" / "hydrogen").write_text("v18.19.0\n")
    (alias / "lts" / "iron").write_text("v20.11.1\n")
    (alias / "lts" / "*").write_text("lts/iron\n")
    (alias / "loop-a").write_text("loop-b\n")
    (alias / "loop-b").write_text("loop-a\n")
    return root


def jdk_home() -> Path:
    require(JAVA is not None, "needs a JDK (java on PATH)")
    assert JAVA is not None
    return Path(os.path.realpath(JAVA)).parent.parent


def jenv_layout(root: Path) -> Path:
    """$JENV_ROOT as `jenv add <jdk>` leaves it: one symlink per alias it generates."""
    home = jdk_home()
    out = subprocess.run([str(home / "bin" / "java"), "-version"], capture_output=True,
                         text=True)
    version = out.stderr.split('"')[1]  # e.g. 17.0.15
    versions = root / "versions"
    versions.mkdir(parents=True)
    major = version.split(".")[0]
    for alias in {f"openjdk64-{version}", version, ".".join(version.split(".")[:2]), major}:
        (versions / alias).symlink_to(home)
    return root


async def spawn_and_wait(auth: Authority, spec: GroupSpec):  # type: ignore[no-untyped-def]
    view = await auth.spawn(spec)
    if not view.state.ended:
        await auth.find(view.group_id).ended.wait()
    return auth.get(view.group_id)


@pytest.fixture
async def plugin_authority(tmp_path: Path) -> AsyncIterator[Authority]:
    auth, signallers = await make_authority(f"tc-{os.getpid()}-{tmp_path.name[-6:]}")
    try:
        yield auth
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()


def use(auth: Authority, *plugins: object) -> None:
    auth.plugins.plugins = registry.order(plugins)  # type: ignore[arg-type]


# ------------------------------------------------------------------ pyenv (the real one)


@pytest.mark.parametrize("content", [
    "3.12\n",                    # a prefix: the newest installed 3.12.x
    "3.11.7\n",                  # exact
    "python-3.10.13\n",          # the python- prefix pyenv drops
    "# pinned\n3.9\n",           # a comment line, then a prefix
    "3.13.0 extra words\n",      # the first word of the line
    "\r\n3.8.18\r\n",            # CRLF and a blank line
])
def test_pyenv_resolves_like_pyenv_itself(tmp_path: Path, content: str) -> None:
    root = pyenv_root()
    project = tmp_path / "proj"
    project.mkdir()
    (project / ".python-version").write_text(content)
    expected = pyenv_says(root, project)
    require(expected != "not installed", f"pyenv here does not have a match for {content!r}")
    spec = build_spec(["python", "-V"], cwd=str(project))
    out = Pyenv(root).enhance(spec)
    assert out.env["PATH"].split(":")[0] == str(root / "versions" / expected / "bin")
    # The rest of PATH is what the child would have searched anyway.
    assert out.env["PATH"].split(":", 1)[1] == os.defpath


async def test_pyenv_group_runs_the_projects_python_and_says_so(
        plugin_authority: Authority, tmp_path: Path) -> None:
    root = pyenv_root()
    project = tmp_path / "proj" / "src"
    project.mkdir(parents=True)
    (tmp_path / "proj" / ".python-version").write_text("3.12\n")  # in a parent directory
    expected = pyenv_says(root, project)
    require(expected.startswith("3.12"), "needs a python 3.12 in pyenv")
    use(plugin_authority, Pyenv(root))
    log = tmp_path / "out.log"
    view = await spawn_and_wait(plugin_authority, build_spec(
        ["python", "-c", "import sys; print(sys.version.split()[0], sys.executable)"],
        cwd=str(project), log=str(log)))
    assert view.exit is not None and view.exit.reason is ExitReason.NATURAL, view.exit
    version, executable = log.read_text().split()
    assert version == expected
    assert executable.startswith(str(root / "versions" / expected))
    change = f"pyenv: PATH += {root}/versions/{expected}/bin"
    assert view.context.plugins == (change,)
    assert view.exit.context.plugins == (change,), "the exit record carries the change too"


async def test_a_version_that_is_not_installed_fails_as_toolchain_missing(
        plugin_authority: Authority, tmp_path: Path) -> None:
    root = pyenv_root()
    (tmp_path / ".python-version").write_text("3.99.1\n")
    use(plugin_authority, Pyenv(root))
    view = await plugin_authority.spawn(build_spec(["python", "-V"], cwd=str(tmp_path)))
    assert view.state is GroupState.FAILED
    assert view.exit is not None and view.exit.failure is FailureClass.TOOLCHAIN_MISSING
    message = view.exit.message
    assert str(tmp_path / ".python-version") in message
    assert "not installed" in message
    assert "3.99.1" not in message, "what a version file holds is never repeated"
    for installed in os.listdir(root / "versions"):
        assert installed in message


async def test_pyenv_version_from_the_spec_environment(tmp_path: Path) -> None:
    root = pyenv_root()
    (tmp_path / ".python-version").write_text("3.99\n")  # PYENV_VERSION wins, as in pyenv
    expected = pyenv_says(root, tmp_path, "3.11")
    require(expected != "not installed", "needs a python 3.11 in pyenv")
    spec = build_spec(["python", "-V"], cwd=str(tmp_path), env={"PYENV_VERSION": "3.11"})
    out, changes = await Plugins([Pyenv(root)]).apply(spec)
    assert out.env["PATH"].split(":")[0] == str(root / "versions" / expected / "bin")
    assert changes == (f"pyenv: PATH += {root}/versions/{expected}/bin",)


# ------------------------------------------------------------------ nvm (its documented layout)


NVM_VERSIONS = ["v16.20.2", "v18.19.0", "v20.5.0", "v20.11.1", "v21.7.3"]


@pytest.mark.parametrize(("nvmrc", "expected"), [
    ("v20.5.0", "v20.5.0"),      # an exact version
    ("20.5.0", "v20.5.0"),       # without the v
    ("20", "v20.11.1"),          # a major: the newest installed v20.x.y
    ("20.5", "v20.5.0"),         # major.minor
    ("v18", "v18.19.0"),
    ("node", "v21.7.3"),         # the newest installed
    ("stable", "v21.7.3"),
    ("lts/*", "v20.11.1"),       # alias/lts/* -> lts/iron -> v20.11.1
    ("lts/hydrogen", "v18.19.0"),
    ("lts/-1", "v18.19.0"),      # the LTS line before the latest
    ("default", "v20.11.1"),     # a user alias: default -> 20 -> newest v20
    ("  20  # comment\n", "v20.11.1"),
    ("system", None),            # the system node: nothing changes
])
def test_nvm_resolves_versions_and_aliases_as_nvm_does(tmp_path: Path, nvmrc: str,
                                                       expected: str | None) -> None:
    root = nvm_layout(tmp_path / "nvm", NVM_VERSIONS)
    project = tmp_path / "proj"
    project.mkdir()
    (project / ".nvmrc").write_text(nvmrc + "\n")
    spec = build_spec(["node", "--version"], cwd=str(project))
    out = Nvm(root).enhance(spec)
    if expected is None:
        assert out == spec
    else:
        assert out.env["PATH"].split(":")[0] == str(root / "versions/node" / expected / "bin")


@pytest.mark.parametrize(("nvmrc", "says"), [
    ("22", "not installed"),
    ("v20.99.0", "not installed"),
    ("lts/jod", "not installed"),        # an LTS line nvm never saw
    ("loop-a", "loop"),                  # aliases that point at each other
    ("../../../etc", "not a node version"),
    ("iojs", "not installed"),
])
def test_nvm_refuses_what_is_not_installed_or_not_a_version(tmp_path: Path, nvmrc: str,
                                                           says: str) -> None:
    root = nvm_layout(tmp_path / "nvm", NVM_VERSIONS)
    (tmp_path / ".nvmrc").write_text(nvmrc + "\n")
    with pytest.raises(ToolchainMissing) as caught:
        Nvm(root).enhance(build_spec(["node"], cwd=str(tmp_path)))
    assert caught.value.failure is FailureClass.TOOLCHAIN_MISSING
    assert says in caught.value.message
    assert str(tmp_path / ".nvmrc") in caught.value.message
    if says == "not installed":
        assert "v20.11.1" in caught.value.message, "it lists what is installed"
        assert repr(nvmrc) not in caught.value.message, "the file's text is not repeated"
        assert f" {nvmrc}" not in caught.value.message.replace(str(tmp_path), "")


async def test_nvm_group_runs_node_from_the_nvm_dir(plugin_authority: Authority,
                                                    tmp_path: Path) -> None:
    root = nvm_layout(tmp_path / "nvm", NVM_VERSIONS)
    project = tmp_path / "app"
    project.mkdir()
    (project / ".nvmrc").write_text("lts/*\n")
    use(plugin_authority, Nvm(root))
    log = tmp_path / "out.log"
    view = await spawn_and_wait(plugin_authority, build_spec(
        ["sh", "-c", "command -v node; node -e 'console.log(process.version)'"],
        cwd=str(project), log=str(log)))
    assert view.exit is not None and view.exit.reason is ExitReason.NATURAL, view.exit
    where, version = log.read_text().split()
    assert where == str(root / "versions/node/v20.11.1/bin/node")
    assert version.startswith("v")  # the real binary ran
    assert view.context.plugins == (f"nvm: PATH += {root}/versions/node/v20.11.1/bin",)


# ------------------------------------------------------------------ jenv (its documented layout)


@pytest.mark.parametrize("wanted", ["MAJOR", "java-MAJOR", "MAJOR.0", "openjdk64-FULL"])
async def test_jenv_sets_java_home_and_path(plugin_authority: Authority, tmp_path: Path,
                                            wanted: str) -> None:
    root = jenv_layout(tmp_path / "jenv")
    full = next(p.name for p in (root / "versions").iterdir() if p.name.count(".") == 2)
    major = full.split(".")[0]
    name = wanted.replace("MAJOR", major).replace("FULL", full)
    project = tmp_path / "svc"
    project.mkdir()
    (project / ".java-version").write_text(name + "\n")
    use(plugin_authority, Jenv(root))
    log = tmp_path / "out.log"
    view = await spawn_and_wait(plugin_authority, build_spec(
        ["sh", "-c", 'echo "$JAVA_HOME"; command -v java; java -version 2>&1 | head -1'],
        cwd=str(project), log=str(log)))
    assert view.exit is not None and view.exit.reason is ExitReason.NATURAL, view.exit
    home, java, banner = log.read_text().splitlines()
    alias = name.removeprefix("java-")
    assert home == str(root / "versions" / alias)
    assert java == f"{home}/bin/java"
    assert full in banner
    assert f"jenv: JAVA_HOME = {home}" in view.context.plugins
    assert f"jenv: PATH += {home}/bin" in view.context.plugins


def test_jenv_names_what_is_installed_when_a_version_is_missing(tmp_path: Path) -> None:
    root = jenv_layout(tmp_path / "jenv")
    (tmp_path / ".java-version").write_text("11\n")
    with pytest.raises(ToolchainMissing) as caught:
        Jenv(root).enhance(build_spec(["java"], cwd=str(tmp_path)))
    assert str(tmp_path / ".java-version") in caught.value.message
    assert "'11'" not in caught.value.message and " 11" not in caught.value.message
    for alias in os.listdir(root / "versions"):
        assert alias in caught.value.message


# ------------------------------------------------------------------ .tool-versions (asdf layout)


def test_tool_versions_takes_the_first_installed_and_the_nearest_file(tmp_path: Path) -> None:
    require(NODE is not None, "needs node on PATH")
    assert NODE is not None
    data = tmp_path / "asdf"
    for tool, version in (("nodejs", "20.11.1"), ("python", "3.12.1")):
        bin_dir = data / "installs" / tool / version / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / ("node" if tool == "nodejs" else "python")).symlink_to(NODE)
    outer = tmp_path / "repo"
    inner = outer / "service"
    inner.mkdir(parents=True)
    (outer / ".tool-versions").write_text("python 3.12.1\nnodejs 18.0.0\n")
    (inner / ".tool-versions").write_text("# nearest file wins per tool\nnodejs 18.0.0 20.11.1\n")
    out = ToolVersions(data).enhance(build_spec(["node"], cwd=str(inner)))
    path = out.env["PATH"].split(":")
    assert str(data / "installs/nodejs/20.11.1/bin") in path
    assert str(data / "installs/python/3.12.1/bin") in path
    (inner / ".tool-versions").write_text("nodejs 19.0.0\n")
    with pytest.raises(ToolchainMissing,
                       match=r"a nodejs version that is not installed.*installed: 20\.11\.1"
                       ) as caught:
        ToolVersions(data).enhance(build_spec(["node"], cwd=str(inner)))
    assert "19.0.0" not in caught.value.message


# ------------------------------------------------------------------ the mechanism


def test_only_detected_tools_are_registered_in_priority_order(tmp_path: Path) -> None:
    nvm_layout(tmp_path / "nvm", ["v20.11.1"])
    jenv_layout(tmp_path / "jenv")
    home = tmp_path / "home"
    home.mkdir()
    context = PluginContext({"HOME": str(home), "NVM_DIR": str(tmp_path / "nvm"),
                             "JENV_ROOT": str(tmp_path / "jenv"),
                             "PYENV_ROOT": str(pyenv_root())})
    found = registry.load(context)
    assert [p.name for p in found] == ["jenv", "nvm", "pyenv"]  # asdf, mise: not here
    assert [p.name for p in registry.load(context, disabled=["nvm"])] == ["jenv", "pyenv"]
    (tmp_path / "asdf" / "installs").mkdir(parents=True)
    context = PluginContext({**context.environ, "ASDF_DATA_DIR": str(tmp_path / "asdf")})
    assert registry.load(context)[0].name == "asdf"  # lower priority runs first


def test_changes_are_described_one_line_each() -> None:
    before = build_spec(["node"], env={"PATH": "/usr/bin", "A": "1", "GONE": "x"})
    after = replace(before, env={"PATH": "/opt/x/bin:/usr/bin", "A": "2", "JAVA_HOME": "/j"})
    assert describe_changes("t", before, after) == (
        "t: A = 2", "t: GONE unset", "t: JAVA_HOME = /j", "t: PATH += /opt/x/bin")


@dataclass
class Stuck:
    """A plugin whose version file is a FIFO nobody writes: its read blocks for real, as a
    file on a stuck network mount would."""

    fifo: Path
    name: str = "stuck"
    priority: int = 10

    def applies(self, spec: GroupSpec) -> bool:
        return True

    def enhance(self, spec: GroupSpec) -> GroupSpec:
        with open(self.fifo) as f:  # blocks until a writer comes
            f.read()
        return spec


@dataclass
class Broken:
    name: str = "broken"
    priority: int = 20

    def applies(self, spec: GroupSpec) -> bool:
        return True

    def enhance(self, spec: GroupSpec) -> GroupSpec:
        return replace(spec, target="ssh:elsewhere")  # not a change a plugin may make


class Failures(Hooks):
    def __init__(self) -> None:
        self.failed: list[str] = []

    def plugin_failure(self, plugin: str) -> None:
        self.failed.append(plugin)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "stuck.fifo"
    os.mkfifo(path)
    yield path
    # Let the stuck thread go: a writer's open releases the reader's.
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_stuck_or_broken_plugin_leaves_the_spec_unchanged_and_the_loop_free(
        tmp_path: Path, fifo: Path) -> None:
    failures = Failures()
    auth, signallers = await make_authority(f"stuck-{os.getpid()}")
    auth.plugins.on_failure = failures.plugin_failure
    auth.plugins.deadline = 0.5
    use(auth, Stuck(fifo), Broken())
    try:
        ticks = 0
        stop = asyncio.Event()

        async def tick() -> None:  # the event loop keeps running while the plugin is stuck
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        view = await auth.spawn(build_spec(["true"], cwd=str(tmp_path)))
        stop.set()
        await ticker
        assert view.state in (GroupState.RUNNING, GroupState.EXITED), view
        assert view.context.plugins == ()
        assert failures.failed == ["stuck", "broken"]
        assert ticks > 10
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()


async def test_no_plugins_and_other_targets_leave_specs_alone(plugin_authority: Authority,
                                                             tmp_path: Path) -> None:
    root = nvm_layout(tmp_path / "nvm", NVM_VERSIONS)
    (tmp_path / ".nvmrc").write_text("20\n")
    use(plugin_authority, Nvm(root))
    view = await plugin_authority.spawn(build_spec(["true"], cwd=str(tmp_path), plugins=False))
    assert view.context.plugins == ()
    # Another host does not see this one's version files: plugins do not apply there.
    view = await plugin_authority.spawn(build_spec(["true"], cwd=str(tmp_path),
                                                   target="ssh:nobody@127.0.0.1:1"))
    assert view.state is GroupState.FAILED and view.context.plugins == ()
    view = await plugin_authority.spawn(build_spec(["true"], cwd=str(tmp_path)))
    assert view.context.plugins == (f"nvm: PATH += {root}/versions/node/v20.11.1/bin",)


async def test_a_version_file_that_is_a_fifo_is_never_read(plugin_authority: Authority,
                                                           tmp_path: Path) -> None:
    root = nvm_layout(tmp_path / "nvm", NVM_VERSIONS)
    os.mkfifo(tmp_path / ".nvmrc")  # nvm looks for a regular file: this is not one
    use(plugin_authority, Nvm(root))
    view = await plugin_authority.spawn(build_spec(["true"], cwd=str(tmp_path)))
    assert view.context.plugins == ()


@pytest.mark.parametrize("content", ["20\0", "../20", "v20/../../x", "x" * 300])
def test_hostile_version_strings_are_refused(tmp_path: Path, content: str) -> None:
    root = nvm_layout(tmp_path / "nvm", NVM_VERSIONS)
    (tmp_path / ".nvmrc").write_bytes(content.encode())
    with pytest.raises(ToolchainMissing, match="not a node version"):
        Nvm(root).enhance(build_spec(["node"], cwd=str(tmp_path)))


def test_a_version_file_linked_to_a_secret_is_not_echoed(tmp_path: Path) -> None:
    root = nvm_layout(tmp_path / "nvm", NVM_VERSIONS)
    secret = tmp_path / "shadow"
    secret.write_text("root:$y$j9T$SECRETHASH:19000:0:99999:7:::\n")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / ".nvmrc").symlink_to(secret)
    with pytest.raises(ToolchainMissing) as caught:
        Nvm(root).enhance(build_spec(["node"], cwd=str(tmp_path / "proj")))
    assert "SECRETHASH" not in caught.value.message and "root:" not in caught.value.message


# ------------------------------------------------------------------ through the daemon and CLI


@pytest.fixture
def nvm_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, Path]]:
    root = nvm_layout(tmp_path / "nvm", NVM_VERSIONS)
    monkeypatch.setenv("NVM_DIR", str(root))
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                               "--agent-name", f"tc-{tmp_path.name[-10:]}",
                               "--plugin", "pyenv=off"], tmp_path)
    try:
        yield d, root
    finally:
        stop_daemon(d)


def test_cli_spawn_show_and_stop_report_the_plugin_change(nvm_serve: tuple[Daemon, Path],
                                                         tmp_path: Path) -> None:
    d, root = nvm_serve
    project = tmp_path / "web"
    project.mkdir()
    (project / ".nvmrc").write_text("18\n")
    (project / ".python-version").write_text("3.12\n")  # pyenv is switched off
    res = d.cli("spawn", "--session", "tc", "--label", "web", "--cwd", str(project), "--",
                "sleep", "60", check=True)
    change = f"nvm: PATH += {root}/versions/node/v18.19.0/bin"
    show = d.cli("show", "tc", check=True).stdout
    assert change in show, show
    assert "pyenv" not in show
    group = d.json("show", "tc")["groups"][0]
    assert group["context"]["plugins"] == [change]
    stop = d.json("stop", "tc")
    assert stop["groups"][0]["context"]["plugins"] == [change]
    assert res.returncode == 0
    failed = d.cli("spawn", "--session", "tc2", "--cwd", str(project), "--no-plugins", "--",
                   "true")
    assert failed.returncode == 0, failed.stderr
    file = tmp_path / "s.toml"
    file.write_text(f'session = "tc-up"\n[[group]]\nlabel = "with"\nargv = ["sleep", "60"]\n'
                    f'cwd = "{project}"\n[[group]]\nlabel = "without"\n'
                    f'argv = ["sleep", "60"]\ncwd = "{project}"\nplugins = false\n')
    d.cli("up", str(file), check=True)
    by_label = {g["label"]: g.get("context", {}).get("plugins", [])
                for g in d.json("show", "tc-up")["groups"]}
    assert by_label == {"with": [change], "without": []}
    d.cli("stop", "tc-up", check=True)
    (project / ".nvmrc").write_text("23\n")
    failed = d.cli("spawn", "--session", "tc3", "--cwd", str(project), "--", "true")
    assert failed.returncode == 1
    assert "toolchain_missing" in failed.stderr and str(project / ".nvmrc") in failed.stderr
    assert "names a node version that is not installed" in failed.stderr
