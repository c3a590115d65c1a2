"""deploy/: what operators install, checked with the tools that will read it.

Without Docker: promtool accepts the rules and the scrape config and the rule unit tests
pass; every YAML manifest parses and says what the design promises (DaemonSet with host
PID and gRPC readiness, coordinator with a persistent volume, compose with Prometheus
and the rules); ``systemd-analyze verify`` accepts the units, which keep the guardian
alive (KillMode=process, Delegate=yes); ``tether config check`` accepts the sample.

With Docker (``-m deploy``; marked slow): the images are built from deploy/Dockerfile by
the real engine of tests/plugins/docker_engine.py, with no registry: the base image is a
debootstrapped Debian (mirror taken from this machine's apt sources, cached under
$TETHER_TEST_CACHE, default /var/cache/tether-test) and the Python dependencies are
wheels that the host's pip fetched with the host's pip configuration, installed in the
build with --no-index. The build runs without network. Then a coordinator and two agents
run as containers (host networking on 127.0.0.1; one agent plain, one with the host
access the Dockerfile documents), a session is spawned and stopped through them with
the CLI from the host, the processes are checked gone from the host's /proc, and every
metrics endpoint reports the cleanups.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.common import require, require_binary, require_root
from tests.plugins.docker_engine import DockerEngine, mounts_under
from tests.plugins.processes import free_port, marked_alive, wait_until

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"

CACHE_DIR = Path(os.environ.get("TETHER_TEST_CACHE", "/var/cache/tether-test"))
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "tini")
# Bump when the recipe of the cached base changes.
BASE_RECIPE = "1"


def load_yaml(path: Path) -> list[Any]:
    try:
        import yaml
    except ImportError:
        require(False, "needs PyYAML (pip install pyyaml; part of the [test] extra)")
        raise
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def run(args: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------ Prometheus


def test_promtool_accepts_rules_and_scrape_config() -> None:
    promtool = require_binary("promtool", "prometheus")
    res = run([promtool, "check", "rules", str(PROMETHEUS / "rules.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    res = run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout + res.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    """Orphans fire after 5 minutes (not before, not for a blip), a failed cleanup fires
    at once and clears after 10 minutes, unreachable agents fire after 1 minute."""
    promtool = require_binary("promtool", "prometheus")
    res = run([promtool, "test", "rules", str(PROMETHEUS / "rules_test.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_alert_rules_say_what_the_design_asks() -> None:
    (doc,) = load_yaml(PROMETHEUS / "rules.yml")
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert alerts["TetherOrphans"]["expr"].strip() == "tether_orphans > 0"
    assert alerts["TetherOrphans"]["for"] == "5m"
    assert alerts["TetherCleanupFailed"]["expr"].strip() == \
        'increase(tether_cleanups_total{result="failed"}[10m]) > 0'
    assert alerts["TetherAgentsUnreachable"]["expr"].strip() == \
        'tether_agents{state="unreachable"} > 0'
    assert alerts["TetherAgentsUnreachable"]["for"] == "1m"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    (config,) = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"tether-coordinator", "tether-agent"}
    assert config["rule_files"] == ["rules.yml"]


# ------------------------------------------------------------------ manifests


def test_compose_runs_coordinator_two_agents_and_prometheus_with_the_rules() -> None:
    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"coordinator", "agent-a", "agent-b", "prometheus"}
    (config,) = load_yaml(PROMETHEUS / "prometheus.yml")
    targets = {t for j in config["scrape_configs"] for sc in j.get("static_configs", [])
               for t in sc["targets"]}
    for name in ("coordinator", "agent-a", "agent-b"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert svc["build"]["target"] == ("coordinator" if name == "coordinator" else "agent")
        flags = dict(f.lstrip("-").partition("=")[::2] for f in svc["command"])
        # Non-loopback listeners: TLS or an explicit --insecure (with its warning).
        assert flags["listen"].startswith("0.0.0.0:")
        assert "insecure" in flags or "tls-cert" in flags
        port = flags["metrics-listen"].rsplit(":", 1)[1]
        assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}"
        if name != "coordinator":
            assert flags["coordinator"] == "coordinator:7400"
            assert flags["advertise"] == f"{name}:7401"
            assert svc["stop_grace_period"] == "30s"
    text = (DEPLOY / "compose.yaml").read_text()
    assert "NOT FOR PRODUCTION" in text and "Production must use TLS" in text
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in mounts
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_kubernetes_manifests_daemonset_deployment_service_pvc() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    docs: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_yaml(K8S / name):
            assert doc["apiVersion"] and doc["metadata"]["name"], name
            docs[doc["kind"]] = doc
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert {"Namespace", "DaemonSet", "Deployment", "Service",
            "PersistentVolumeClaim"} <= set(docs)

    ds = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert ds["hostPID"] is True
    (agent,) = ds["containers"]
    assert agent["securityContext"]["privileged"] is True
    assert agent["readinessProbe"]["grpc"]["port"] == 7401
    args = dict(a.lstrip("-").partition("=")[::2] for a in agent["args"])
    assert args["coordinator"] == "tether-coordinator:7400"
    assert args["advertise"] == "$(POD_IP):7401" and args["name"] == "$(NODE_NAME)"
    assert {e["name"] for e in agent["env"]} == {"NODE_NAME", "POD_IP"}
    assert ds["terminationGracePeriodSeconds"] >= 30

    dep = docs["Deployment"]["spec"]
    assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"
    pod = dep["template"]["spec"]
    (coord,) = pod["containers"]
    assert coord["readinessProbe"]["grpc"]["port"] == 7400
    claim = {v["name"]: v for v in pod["volumes"]}["state"]["persistentVolumeClaim"]
    assert claim["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    mount = {m["name"]: m["mountPath"] for m in coord["volumeMounts"]}["state"]
    assert f"--state-dir={mount}" in coord["args"]
    svc = docs["Service"]
    assert svc["metadata"]["name"] == "tether-coordinator"
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "tether-coordinator"}
    assert {p["port"] for p in svc["spec"]["ports"]} == {7400, 9400}


# ------------------------------------------------------------------ systemd, config


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_units_and_images_keep_state_private() -> None:
    """State holds spawn environments and the audit log: 0700 directories everywhere."""
    agent = unit(DEPLOY / "systemd" / "tether-agent.service")["Service"]
    coordinator = unit(DEPLOY / "systemd" / "tether-coordinator.service")["Service"]
    assert agent["StateDirectoryMode"] == coordinator["StateDirectoryMode"] == ["0700"]
    assert coordinator["UMask"] == ["0077"]
    # The agent's groups would inherit a UMask=; it creates its own files private anyway.
    assert "UMask" not in agent
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"install -d -o tether -g tether -m 0700 /var/lib/tether", dockerfile)


def test_systemd_units_verify_and_leave_the_guardian_alone(tmp_path: Path) -> None:
    agent = unit(DEPLOY / "systemd" / "tether-agent.service")["Service"]
    # Only the agent gets the stop signal: it stops its groups in order, and its guardian
    # (same cgroup, own session) must outlive a crashed agent.
    assert agent["KillMode"] == ["process"]
    assert agent["Delegate"] == ["yes"]  # it creates tether.<name>/<group> cgroups
    assert agent["Restart"] == ["always"]
    assert agent["OOMPolicy"] == ["continue"] and agent["TasksMax"] == ["infinity"]
    coordinator = unit(DEPLOY / "systemd" / "tether-coordinator.service")["Service"]
    assert "KillMode" not in coordinator and coordinator["DynamicUser"] == ["yes"]
    for svc, kind in ((agent, "agent"), (coordinator, "coordinator")):
        assert svc["ExecStart"][0].split()[:2] == ["/opt/tether/bin/tether", kind]
        assert "--config /etc/tether/tether.toml" in svc["ExecStart"][0]

    analyze = require_binary("systemd-analyze", "systemd")
    # verify insists that ExecStart exists; the units are checked with a stand-in.
    copies = []
    for name in ("tether-agent.service", "tether-coordinator.service"):
        text = (DEPLOY / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/tether/bin/tether", "/bin/true"))
        copies.append(str(tmp_path / name))
    res = run([analyze, "verify", *copies])
    # verify exits 0 on unknown keys and bad values, but names them: any line is a finding.
    findings = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 0 and not findings, "\n".join(findings)


def test_sample_config_passes_tether_config_check() -> None:
    sample = DEPLOY / "tether.toml.sample"
    res = run([sys.executable, "-m", "tether.coordinator.cli", "config", "check", str(sample)])
    assert res.returncode == 0, res.stdout + res.stderr
    data = tomllib.loads(sample.read_text())
    assert {"agent", "coordinator"} <= set(data)
    assert data["agent"]["state_dir"] == "/var/lib/tether-agent"  # StateDirectory= of the unit
    assert data["coordinator"]["state_dir"] == "/var/lib/tether-coordinator"


def test_dockerfile_has_both_targets_a_base_argument_and_an_init() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", text, re.M)
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)
    assert ("${BASE}", "builder") in stages and ("runtime", "agent") in stages
    assert ("runtime", "coordinator") in stages
    entrypoints = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    assert all(json.loads(e)[0] == "tini" for e in entrypoints) and len(entrypoints) == 2
    for needed in ("--pid=host", "--cgroupns=host", "/var/run/docker.sock", "--privileged"):
        assert needed in text


# ------------------------------------------------------------------ images, for real


def apt_sources() -> list[dict[str, Any]]:
    """Every `deb` entry of this machine's apt configuration (one-line and deb822)."""
    entries: list[dict[str, Any]] = []
    files = [Path("/etc/apt/sources.list")]
    with contextlib.suppress(OSError):
        files += sorted(Path("/etc/apt/sources.list.d").iterdir())
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for para in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = ""
                for line in para.splitlines():
                    if line.startswith("#"):
                        continue
                    if line[:1].isspace() and key:
                        fields[key] += "\n" + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if "deb" not in fields.get("types", "").split() or \
                        fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    entries.append({"uri": uri, "suites": fields.get("suites", "").split(),
                                    "components": fields.get("components", "").split(),
                                    "signed_by": fields.get("signed-by", "")})
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)", line)
                if not m:
                    continue
                opts = dict(o.partition("=")[::2] for o in (m.group(1) or "").split())
                entries.append({"uri": m.group(2), "suites": [m.group(3)],
                                "components": m.group(4).split(),
                                "signed_by": opts.get("signed-by", "")})
    return entries


def debian_mirror() -> tuple[str, str]:
    """(mirror URI, keyring path or "") for SUITE main, as this machine's apt uses it."""
    override = os.environ.get("TETHER_TEST_DEBIAN_MIRROR", "")
    if override:
        return override, ""
    for e in apt_sources():
        if SUITE in e["suites"] and "main" in e["components"] and \
                e["uri"].startswith(("http://", "https://", "file:/")):
            keyring = e["signed_by"] if e["signed_by"].startswith("/") and \
                "\n" not in e["signed_by"] else ""
            return e["uri"], keyring
    require(False, f"no Debian {SUITE} mirror in this machine's apt sources (set "
            "TETHER_TEST_DEBIAN_MIRROR to a mirror URL)")
    raise AssertionError("unreachable")


def unmount_under(root: Path) -> None:
    for point in mounts_under(str(root)):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def base_tarball() -> Path:
    """A debootstrapped Debian with python3, venv and tini, as a tar, cached by recipe."""
    debootstrap = require_binary("debootstrap", "debootstrap")
    mirror, keyring = debian_mirror()
    recipe = json.dumps([BASE_RECIPE, SUITE, mirror, BASE_PACKAGES])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"base-{SUITE}-{key}.tar"
    with open(CACHE_DIR / "base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be making the same tar
        if tarball.exists():
            return tarball
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_DIR))
        root = work / "root"
        try:
            args = [debootstrap, "--variant=minbase", "--components=main",
                    f"--include={','.join(BASE_PACKAGES)}"]
            if keyring:
                args.append(f"--keyring={keyring}")
            res = run([*args, SUITE, str(root), mirror], timeout=900)
            assert res.returncode == 0, (f"debootstrap {SUITE} from {mirror} failed:\n"
                                         f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            unmount_under(root)
            # Smaller image, same function: no package caches, docs or translations.
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                        "usr/share/man", "usr/share/info", "usr/share/locale"):
                for p in (root / sub).glob("*"):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    elif p.name != "lock":
                        p.unlink(missing_ok=True)
            partial = tarball.with_suffix(".partial")
            res = run(["tar", "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*",
                       "--exclude=./sys/*", "-C", str(root), "-cf", str(partial), "."],
                      timeout=300)
            assert res.returncode == 0, res.stderr
            os.replace(partial, tarball)
        finally:
            unmount_under(root)
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return tarball


def wheelhouse(dest: Path) -> None:
    """Wheels of every dependency (and the build backend), fetched by the host's pip with
    the host's configuration (index, mirrors, find-links, certificates): the image build
    then installs offline."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [*meta["project"]["dependencies"], *meta["build-system"]["requires"]]
    res = run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--dest", str(dest), *reqs], timeout=600)
    require(res.returncode == 0, f"the host's pip could not fetch the dependencies: "
            f"{res.stderr[-2000:]}")


def build_context(dest: Path) -> None:
    """What `COPY . /src` needs: the project (no caches, no tests) and a wheelhouse."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    for name in ("agent", "coordinator", "signallers", "protos", "deploy"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    wheelhouse(dest / "wheelhouse")


def docker_build(engine: DockerEngine, context: Path, target: str, tag: str,
                 base: str) -> float:
    started = time.monotonic()
    log: list[str] = []
    # network_mode none: the base already has tini and pip reads only the wheelhouse,
    # so the build proves it needs nothing from outside.
    for chunk in engine.client.api.build(
            path=str(context), dockerfile="deploy/Dockerfile", target=target, tag=tag,
            buildargs={"BASE": base, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/src/wheelhouse"},
            network_mode="none", rm=True, forcerm=True, pull=False, decode=True):
        if "stream" in chunk:
            log.append(chunk["stream"])
            if chunk["stream"].startswith("Step "):
                print(f"[{time.monotonic() - started:6.1f}s] {chunk['stream'].strip()[:90]}")
        if "error" in chunk:
            raise AssertionError(f"docker build --target {target} failed: {chunk['error']}\n"
                                 + "".join(log)[-6000:])
    return time.monotonic() - started


@pytest.fixture(scope="module")
def deploy_images(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[dict[str, Any]]:
    """Base imported, agent and coordinator images built; all removed afterwards."""
    require_root()
    timings: dict[str, float] = {}
    t = time.monotonic()
    tarball = base_tarball()
    timings["base"] = time.monotonic() - t
    run_id = uuid.uuid4().hex[:8]
    base = f"tether-test/deploy-base:{tarball.stem.rsplit('-', 1)[1]}"
    images = {"base": base, "agent": f"tether-test/deploy-agent:{run_id}",
              "coordinator": f"tether-test/deploy-coordinator:{run_id}"}
    api = docker_engine.client.api
    try:
        t = time.monotonic()
        repo, _, tag = base.rpartition(":")
        api.import_image_from_file(str(tarball), repository=repo, tag=tag)
        timings["import"] = time.monotonic() - t
        context = tmp_path_factory.mktemp("deploy-context")
        t = time.monotonic()
        build_context(context)
        timings["wheelhouse"] = time.monotonic() - t
        for target in ("coordinator", "agent"):
            timings[f"build {target}"] = docker_build(docker_engine, context, target,
                                                      images[target], base)
        yield {"images": images, "timings": timings}
    finally:
        for image in (images["agent"], images["coordinator"], images["base"]):
            with contextlib.suppress(Exception):
                api.remove_image(image, force=True)
        with contextlib.suppress(Exception):
            api.prune_images(filters={"dangling": True})


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def cli(coordinator: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    command, *rest = args
    return run([sys.executable, "-m", "tether.coordinator.cli", command,
                "--coordinator", coordinator, *rest], timeout=timeout, env=env)


@pytest.mark.deploy
@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_images_run_coordinator_and_two_agents_spawn_stop_and_metrics(
        docker_engine: DockerEngine, deploy_images: dict[str, Any]) -> None:
    images = deploy_images["images"]
    client = docker_engine.client
    tag = uuid.uuid4().hex[:6]
    cport, cmport = free_port(), free_port()
    coordinator = f"127.0.0.1:{cport}"
    agents = {f"deploy-a-{tag}": (free_port(), free_port(), {}),
              # The host access deploy/Dockerfile documents, with capabilities rather
              # than --privileged (which also needs capabilities a CI sandbox may lack).
              f"deploy-b-{tag}": (free_port(), free_port(), {
                  "pid_mode": "host", "cgroupns": "host",
                  "cap_add": ["SYS_ADMIN", "KILL", "SYS_PTRACE"],
                  "volumes": {"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}}})}
    containers: list[Any] = []

    def start(image: str, command: list[str], name: str, **kw: Any) -> Any:
        c = client.containers.run(image, command, name=name, detach=True, network_mode="host",
                                  **kw)
        containers.append(c)
        return c

    def logs() -> str:
        out = []
        for c in containers:
            with contextlib.suppress(Exception):
                out.append(f"--- {c.name}\n{c.logs(tail=60).decode(errors='replace')}")
        return "\n".join(out)

    try:
        start(images["coordinator"],
              ["--listen", coordinator, "--metrics-listen", f"127.0.0.1:{cmport}",
               "--state-dir", "/var/lib/tether", "--agent-ttl", "5"], f"coordinator-{tag}")
        for name, (port, mport, extra) in agents.items():
            start(images["agent"],
                  ["--name", name, "--listen", f"127.0.0.1:{port}", "--coordinator", coordinator,
                   "--metrics-listen", f"127.0.0.1:{mport}", "--state-dir", "/var/lib/tether"],
                  name, **extra)

        def up() -> bool:
            res = cli(coordinator, "agents", "-o", "json", timeout=15)
            if res.returncode != 0:
                return False
            states = {a["name"]: a["state"] for a in json.loads(res.stdout)["agents"]}
            return all(states.get(n) == "up" for n in agents)

        try:
            wait_until(up, 60, "both agent containers to register with the coordinator")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs()}") from None

        # The images' own health probe, and tini as PID 1 of the plain agent container.
        plain = containers[1]
        res = plain.exec_run(["tether-health", f"127.0.0.1:{agents[plain.name][0]}"])
        assert res.exit_code == 0, res.output
        assert plain.exec_run(["cat", "/proc/1/comm"]).output.decode().strip() == "tini"
        assert containers[0].exec_run(["id", "-u"]).output.decode().strip() == "10001"

        session = f"deploy-{tag}"
        for name in agents:
            # A leader and a setsid escapee: the containment must hold both.
            res = cli(coordinator, "spawn", "--session", session, "--agent", name,
                      "--env", "PATH=/usr/local/bin:/usr/bin:/bin", "--grace", "5", "--",
                      "/bin/sh", "-c", "setsid sleep 3000 & exec sleep 3001")
            assert res.returncode == 0, res.stderr + logs()
        shown = json.loads(cli(coordinator, "show", session, "-o", "json").stdout)
        assert {g["agent"] for g in shown["groups"]} == set(agents)
        assert all(g["state"] == "running" for g in shown["groups"]), shown
        for name in agents:
            # Seen from the host's /proc, not from tether: leader and escapee.
            wait_until(lambda n=name: len(marked_alive(agent=n)) >= 2, 10,
                       f"both processes of {name}'s group")

        res = cli(coordinator, "stop", session, "-o", "json", timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr + logs()
        report = json.loads(res.stdout)
        for g in report["groups"]:
            assert g["reason"] == "requested" and g["survivors"] == 0, g
        for name in agents:
            wait_until(lambda n=name: not marked_alive(agent=n), 15,
                       f"every process of {name}'s group to be gone")

        for name, (_, mport, _) in agents.items():
            m = metrics(mport)
            assert m[("tether_cleanups_total", (("result", "success"),))] == 1, name
            assert m[("tether_cleanups_total", (("result", "failed"),))] == 0, name
            assert m[("tether_orphans", ())] == 0, name
            assert ("tether_cleanup_duration_seconds_count", ()) in m
        m = metrics(cmport)
        assert m[("tether_agents", (("state", "up"),))] == 2
        assert m[("tether_session_stops_total", (("result", "clean"),))] == 1
        containments = {g["agent"]: g["containment"] for g in shown["groups"]}
        print(f"containment per agent: {containments}; timings: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in deploy_images["timings"].items()))
    finally:
        for c in reversed(containers):  # agents first: they stop their groups
            with contextlib.suppress(Exception):
                c.stop(timeout=30)
            with contextlib.suppress(Exception):
                c.remove(force=True)
        for name in agents:  # belt and braces: nothing of ours may outlive the test
            for pid in marked_alive(agent=name):
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
