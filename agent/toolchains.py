"""Built-in toolchain plugins: the project's node, python or java, not the agent's.

Each follows its tool's documented rules, reading only the tool's own directory layout
(no tool runs):

* **nvm**: ``.nvmrc`` in the working directory or the nearest parent; its first
  line (``#`` comments and whitespace dropped). ``node``/``stable`` is the newest
  installed, ``lts/*``, ``lts/NAME`` and ``lts/-N`` come from ``$NVM_DIR/alias/lts``,
  other names are aliases in ``$NVM_DIR/alias`` (followed, loops refused), ``20`` and
  ``20.11`` are the newest installed ``v20.x.y`` / ``v20.11.y``, ``v20.11.1`` is that
  one, ``system`` changes nothing. ``$NVM_DIR/versions/node/vX.Y.Z/bin`` goes first
  on PATH.
* **pyenv**: ``PYENV_VERSION`` in the spec's environment, else ``.python-version`` in
  the working directory or the nearest parent; the first word of each line (several
  versions: all of them, in order). A version is a directory of
  ``$PYENV_ROOT/versions``, or with a ``python-`` prefix dropped, or a prefix resolved
  to the newest installed match (``3.12`` -> ``3.12.1``; no dev, rc or free-threaded
  builds), as ``pyenv latest`` does. ``$PYENV_ROOT/versions/X/bin`` goes first on PATH.
* **jenv**: ``JENV_VERSION`` in the spec's environment, else ``.java-version`` (or the
  older ``.jenv-version``) in the working directory or the nearest parent; its first
  word. A version is an entry of ``$JENV_ROOT/versions`` (``jenv add`` makes
  ``17``, ``17.0``, ``17.0.15``, ``openjdk64-17.0.15``), or with a ``java-`` prefix
  dropped. ``JAVA_HOME`` is ``$JENV_ROOT/versions/X`` and its ``bin`` goes first on PATH.
* **asdf** / **mise**: ``.tool-versions`` files from the working directory up; for
  each tool the nearest file naming it decides; ``TOOL V1 [V2...]`` takes the first
  installed of the versions listed; ``system`` changes nothing for that tool.
  ``<data dir>/installs/TOOL/VERSION/bin`` goes first on PATH.

Version files are found and read by ``tether.agent.versionfiles``: from the working
directory up to a directory others may write, regular files of trusted owners only,
readable by the group's ``--user``, at most 4 KiB. Versions come from a strict alphabet;
a version never names a directory outside its tool's versions directory (``../../etc``
is refused). A version that is not installed fails the start as ``toolchain_missing``
naming the file and what is installed, never what the file holds (it may be a link to a
secret). Plugins apply to groups on the local target with a working directory
(``--cwd``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tether.agent.plugins import PluginContext, prepend_path
from tether.agent.versionfiles import (
    ToolchainMissing,
    VersionFile,
    find_version_file,
    read_tool_file,
    version_files,
)
from tether.core.model import GroupSpec

VERSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+*/-]{0,127}\Z")
PRIORITY_TOOL_VERSIONS: Final = 40
PRIORITY_TOOL: Final = 50


# ---------------------------------------------------------------- shared helpers


def lines(text: str, comments: bool = True) -> Iterator[str]:
    for raw in text.replace("\r", "").split("\n"):
        line = raw.split("#", 1)[0] if comments else raw
        line = line.strip()
        if line:
            yield line


def check_version(token: str, path: Path | str, tool: str) -> str:
    """A version token from a file; anything else is refused without being echoed (the file
    may be a link to something secret, e.g. ``.nvmrc -> /etc/shadow``)."""
    if not VERSION.match(token) or ".." in token.split("/") or "\0" in token:
        raise ToolchainMissing(
            f"{path} names something that is not a {tool} version (letters, digits and "
            "._+-/* only, at most 128, no '..'); write a version such as 20.11.1 or lts/iron")
    return token


def inside(base: Path, candidate: Path) -> bool:
    """``candidate`` resolves to a directory inside ``base`` (symlinks followed)."""
    try:
        real_base = base.resolve()
        real = candidate.resolve()
    except OSError:
        return False
    return real != real_base and real.is_relative_to(real_base) and real.is_dir()


def version_dir(base: Path, name: str) -> Path | None:
    """``base/name`` if it is an installed version. A plain name may be a symlink to a
    toolchain elsewhere (as ``jenv add`` and hand-linked pythons make); a name with a
    ``/`` must stay inside ``base`` once resolved (pyenv's rule against traversal)."""
    if not name or name in (".", ".."):
        return None
    candidate = base / name
    if "/" in name:
        return candidate if inside(base, candidate) else None
    try:
        return candidate if candidate.is_dir() else None
    except OSError:
        return None


def version_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key comparing numeric parts as numbers: 3.9.18 < 3.10.13."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+]", name))


def listing(d: Path) -> list[str]:
    try:
        return sorted((e.name for e in os.scandir(d) if e.is_dir()), key=version_key)
    except OSError:
        return []


def shown(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def local_with_cwd(spec: GroupSpec) -> bool:
    return bool(spec.cwd)


def origin_of(origin: Path | str) -> str:
    """Where a version came from, for messages: a file, or a variable of the spec's env."""
    return str(origin) if isinstance(origin, Path) else f"{origin} in the spec's environment"


def not_installed(origin: Path | str, what: str, where: Path, installed: Sequence[str],
                  how: str) -> ToolchainMissing:
    """A version that is not installed, without echoing it (what a file holds is not
    repeated: it may be a link to a secret)."""
    change = f"change {origin.name}" if isinstance(origin, Path) else f"change {origin}"
    return ToolchainMissing(
        f"{origin_of(origin)} names {what} that is not installed under {where} (installed: "
        f"{shown(installed)}); {how} on the agent's host or {change}")


# ---------------------------------------------------------------- nvm


@dataclass
class Nvm:
    """``.nvmrc`` -> ``$NVM_DIR/versions/node/vX.Y.Z/bin`` first on PATH."""

    root: Path
    name: str = "nvm"
    priority: int = PRIORITY_TOOL

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions" / "node"

    def applies(self, spec: GroupSpec) -> bool:
        return local_with_cwd(spec) and find_version_file(spec, [".nvmrc"]) is not None

    def installed(self) -> list[str]:
        return [v for v in listing(self.versions_dir)
                if re.fullmatch(r"v\d+\.\d+\.\d+", v)
                and (self.versions_dir / v / "bin" / "node").exists()]

    def enhance(self, spec: GroupSpec) -> GroupSpec:
        found = find_version_file(spec, [".nvmrc"])
        if found is None:
            return spec
        path = found.path
        wanted = next(lines(found.text), "")
        if not wanted:
            raise ToolchainMissing(f"{path} is empty; write the node version to use, e.g. 20 "
                                   "or lts/*")
        check_version(wanted, path, "node")
        version = self.resolve(wanted, path)
        if version is None:  # system
            return spec
        return prepend_path(spec, str(self.versions_dir / version / "bin"))

    def resolve(self, wanted: str, path: Path) -> str | None:
        installed = self.installed()
        seen: list[str] = []
        current = wanted
        while True:
            if current == "system":
                return None
            if current in ("node", "stable"):
                if installed:
                    return installed[-1]
                break
            if current == "lts/*" or current.startswith("lts/"):
                target = self._lts(current)
                if target is None:
                    break
                current = target
            elif re.fullmatch(r"v?\d+(\.\d+){0,2}\.?", current):
                return self._match(current, installed, wanted, path)
            else:
                alias = self._alias(current)
                if alias is None:
                    break
                current = alias
            if current in seen or len(seen) > 16:
                # The chain is what $NVM_DIR/alias holds (the tool's files), not the .nvmrc.
                raise ToolchainMissing(f"{path} names an nvm alias whose aliases loop "
                                       f"({' -> '.join([*seen, current])}); fix the alias")
            seen.append(current)
        raise self._missing(path, installed, seen)

    def _match(self, version: str, installed: list[str], wanted: str, path: Path) -> str:
        text = version.removeprefix("v").rstrip(".")
        parts = text.split(".")
        if len(parts) == 3:
            if "v" + text in installed:
                return "v" + text
        else:
            matches = [v for v in installed if v[1:].split(".")[:len(parts)] == parts]
            if matches:
                return matches[-1]
        raise self._missing(path, installed, [] if version == wanted else [version])

    def _read_alias(self, file: Path) -> str | None:
        alias_dir = self.root / "alias"
        try:
            real = file.resolve()
            if not real.is_relative_to(alias_dir.resolve()) or not real.is_file():
                return None
            text = next(lines(read_tool_file(real)), "")
        except OSError:
            return None
        return check_version(text, file, "node") if text else None

    def _alias(self, name: str) -> str | None:
        return self._read_alias(self.root / "alias" / name)

    def _lts(self, name: str) -> str | None:
        lts_dir = self.root / "alias" / "lts"
        rest = name.removeprefix("lts/")
        m = re.fullmatch(r"-([1-9][0-9]*)", rest)
        if m is not None:
            try:
                names = sorted(os.listdir(lts_dir))
            except OSError:
                return None
            n = int(m.group(1)) + 1
            if n > len(names) or names[-n] == "*":
                return None
            rest = names[-n]
        return self._read_alias(lts_dir / rest)

    def _missing(self, path: Path, installed: list[str], via: list[str]) -> ToolchainMissing:
        # ``via``: what nvm's own alias files led to (never the .nvmrc's own text).
        chain = f" (through nvm aliases to {' -> '.join(via)})" if via else ""
        return not_installed(path, f"a node version{chain}", self.versions_dir, installed,
                             "install it with `nvm install`")


def nvm(context: PluginContext) -> Nvm | None:
    env = context.environ
    root = Path(env.get("NVM_DIR") or Path(env.get("HOME", "/nonexistent")) / ".nvm")
    return Nvm(root) if (root / "versions" / "node").is_dir() else None


# ---------------------------------------------------------------- pyenv


_PYENV_SKIP = re.compile(r"(-dev|-src|-latest|(a|b|rc)[0-9]+|[0-9]t)\Z")


@dataclass
class Pyenv:
    """``.python-version`` -> ``$PYENV_ROOT/versions/X/bin`` first on PATH."""

    root: Path
    name: str = "pyenv"
    priority: int = PRIORITY_TOOL

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def applies(self, spec: GroupSpec) -> bool:
        if spec.env.get("PYENV_VERSION"):
            return True
        return local_with_cwd(spec) and find_version_file(spec, [".python-version"]) is not None

    def enhance(self, spec: GroupSpec) -> GroupSpec:
        origin: Path | str
        if spec.env.get("PYENV_VERSION"):
            origin = "PYENV_VERSION"
            wanted = spec.env["PYENV_VERSION"].replace(":", " ").split()
        else:
            found = find_version_file(spec, [".python-version"])
            if found is None:
                return spec
            origin = found.path
            wanted = [line.split()[0] for line in lines(found.text, comments=False)
                      if not line.startswith("#")]
        if not wanted:
            raise ToolchainMissing(f"{origin_of(origin)} names no python version; write one, "
                                   "e.g. 3.12")
        dirs = []
        for v in wanted:
            check_version(v, origin_of(origin), "python")
            resolved = self.resolve(v, origin)
            if resolved is not None:
                dirs.append(str(self.versions_dir / resolved / "bin"))
        return prepend_path(spec, *dirs) if dirs else spec

    def installed(self) -> list[str]:
        return listing(self.versions_dir)

    def resolve(self, version: str, origin: Path | str) -> str | None:
        if version == "system":
            return None
        for candidate in (version, version.removeprefix("python-")):
            if version_dir(self.versions_dir, candidate) is not None:
                return candidate
        for prefix in (version, version.removeprefix("python-")):
            if "/" in prefix:
                continue
            matches = [v for v in self.installed()
                       if (v.startswith(prefix + ".") or v.startswith(prefix + "-"))
                       and not _PYENV_SKIP.search(v)]
            if matches:
                return matches[-1]
        raise not_installed(origin, "a python version", self.versions_dir, self.installed(),
                            "install it with `pyenv install`")


def pyenv(context: PluginContext) -> Pyenv | None:
    env = context.environ
    root = Path(env.get("PYENV_ROOT") or Path(env.get("HOME", "/nonexistent")) / ".pyenv")
    return Pyenv(root) if (root / "versions").is_dir() else None


# ---------------------------------------------------------------- jenv


@dataclass
class Jenv:
    """``.java-version`` -> ``JAVA_HOME=$JENV_ROOT/versions/X``, its ``bin`` first on PATH."""

    root: Path
    name: str = "jenv"
    priority: int = PRIORITY_TOOL

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def applies(self, spec: GroupSpec) -> bool:
        if spec.env.get("JENV_VERSION"):
            return True
        return local_with_cwd(spec) and find_version_file(
            spec, [".java-version", ".jenv-version"]) is not None

    def enhance(self, spec: GroupSpec) -> GroupSpec:
        origin: Path | str
        if spec.env.get("JENV_VERSION"):
            origin, wanted = "JENV_VERSION", spec.env["JENV_VERSION"].strip()
        else:
            found = find_version_file(spec, [".java-version", ".jenv-version"])
            if found is None:
                return spec
            origin = found.path
            wanted = next((line.split()[0] for line in lines(found.text, comments=False)), "")
        if not wanted:
            raise ToolchainMissing(f"{origin_of(origin)} names no java version; write one, "
                                   "e.g. 17")
        check_version(wanted, origin_of(origin), "java")
        if wanted == "system":
            return spec
        for candidate in (wanted, wanted.removeprefix("java-")):
            home = version_dir(self.versions_dir, candidate)
            if home is not None:
                return prepend_path(spec, str(home / "bin"), JAVA_HOME=str(home))
        raise not_installed(origin, "a java version", self.versions_dir, self.installed(),
                            "add it with `jenv add /path/to/jdk`")

    def installed(self) -> list[str]:
        try:
            return sorted((e.name for e in os.scandir(self.versions_dir)
                           if e.is_dir(follow_symlinks=True)), key=version_key)
        except OSError:
            return []


def jenv(context: PluginContext) -> Jenv | None:
    env = context.environ
    root = Path(env.get("JENV_ROOT") or Path(env.get("HOME", "/nonexistent")) / ".jenv")
    return Jenv(root) if (root / "versions").is_dir() else None


# ---------------------------------------------------------------- .tool-versions


@dataclass
class ToolVersions:
    """``.tool-versions`` (asdf, mise) -> ``<data>/installs/TOOL/VERSION/bin`` on PATH."""

    root: Path
    name: str = "asdf"
    priority: int = PRIORITY_TOOL_VERSIONS

    def applies(self, spec: GroupSpec) -> bool:
        return local_with_cwd(spec) and find_version_file(spec, [".tool-versions"]) is not None

    def enhance(self, spec: GroupSpec) -> GroupSpec:
        decided: dict[str, tuple[list[str], VersionFile]] = {}
        for found in version_files(spec, [".tool-versions"]):
            for line in lines(found.text):
                words = line.split()
                if len(words) >= 2 and words[0] not in decided:
                    decided[words[0]] = (words[1:], found)
        dirs = []
        for tool, (versions, found) in decided.items():
            if "/" in check_version(tool, found.path, "tool"):
                raise ToolchainMissing(f"{found.path} names a tool with a '/' in its name; a "
                                       "tool name is a directory of installs")
            chosen = self.pick(tool, versions, found.path)
            if chosen is not None:
                dirs.append(str(chosen / "bin"))
        return prepend_path(spec, *dirs) if dirs else spec

    def pick(self, tool: str, versions: list[str], path: Path) -> Path | None:
        installs = self.root / "installs"
        base = installs / tool
        for v in versions:
            if v == "system":
                return None
            check_version(v, path, "version")
            found = version_dir(base, v)
            if found is not None:
                return found
        # A tool that is installed is named (its directory says so); anything else the file
        # holds is not repeated.
        if version_dir(installs, tool) is None:
            raise ToolchainMissing(
                f"{path} names a tool that is not installed under {installs} (installed "
                f"tools: {shown(listing(installs))}); install it with {self.name} on the agent's "
                f"host or change {path.name}")
        raise not_installed(path, f"a {tool} version", base, listing(base),
                            f"install it with `{self.name} install {tool}`")


def _data_dir(env: Mapping[str, str], var: str, default: str) -> Path:
    return Path(env.get(var) or Path(env.get("HOME", "/nonexistent")) / default)


def asdf(context: PluginContext) -> ToolVersions | None:
    root = _data_dir(context.environ, "ASDF_DATA_DIR", ".asdf")
    return ToolVersions(root, "asdf") if (root / "installs").is_dir() else None


def mise(context: PluginContext) -> ToolVersions | None:
    env = context.environ
    xdg = env.get("XDG_DATA_HOME")
    root = Path(env["MISE_DATA_DIR"]) if env.get("MISE_DATA_DIR") else (
        Path(xdg) / "mise" if xdg else _data_dir(env, "", ".local/share/mise"))
    return ToolVersions(root, "mise") if (root / "installs").is_dir() else None
