"""deploy/ for coordinators in high availability (issue 18): compose and Kubernetes.

The HA set-up is layered on the single-coordinator files (which test_deploy.py checks
as they are): a compose override and a kustomize overlay. These tests read them as the
tools would and check what the set-up needs: PostgreSQL, two coordinators advertising
their own address, agents that know both, the store URL never on a command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def flags(args: list[str]) -> dict[str, str]:
    return dict(a.lstrip("-").partition("=")[::2] for a in args)


def test_compose_override_adds_postgresql_and_a_second_coordinator() -> None:
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    ha = yaml.safe_load((DEPLOY / "compose.ha.yaml").read_text())
    services = ha["services"]
    assert {"postgres", "coordinator", "coordinator-2"} <= set(services)
    assert set(base["services"]) | {"postgres", "coordinator-2"} == \
        set(base["services"]) | set(services)
    coordinators = {n: services[n] for n in ("coordinator", "coordinator-2")}
    advertised = set()
    for name, svc in coordinators.items():
        f = flags(svc["command"])
        advertised.add(f["advertise"])
        assert f["advertise"] == f"{name}:7400" and "store" not in f, \
            "the URL holds a password: environment, not the command line"
        assert svc["environment"]["TETHER_STORE"].startswith("postgresql://")
        assert svc["build"]["args"]["EXTRAS"] == "postgresql"
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    for agent in ("agent-a", "agent-b"):
        assert set(flags(services[agent]["command"])["coordinator"].split(",")) == advertised
    assert services["postgres"]["image"].startswith("postgres:")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_overlay_runs_two_replicas_with_the_store_url_from_a_secret() -> None:
    overlay = DEPLOY / "k8s-ha"
    (kustomization,) = _docs(overlay / "kustomization.yaml")
    assert kustomization["resources"] == ["../k8s"]
    (patch,) = _docs(overlay / "coordinator-ha.yaml")
    spec = patch["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (container,) = spec["template"]["spec"]["containers"]
    f = flags(container["args"])
    assert f["advertise"] == "$(POD_IP):7400" and "store" not in f
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert env["TETHER_STORE"]["secretKeyRef"] == {"name": "tether-store", "key": "url"}
    assert env["POD_IP"]["fieldRef"]["fieldPath"] == "status.podIP"
    targets = {p["target"]["kind"] for p in kustomization["patches"] if "target" in p}
    assert targets == {"PersistentVolumeClaim", "Deployment"}


def test_kubernetes_overlay_builds_with_kustomize(tmp_path: Path) -> None:
    """Where kubectl is installed: the overlay renders, without the claim."""
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:  # optional: .ci/install-deps does not install it (not in Debian 12)
        pytest.skip("needs kubectl (for `kubectl kustomize`)")
    res = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s-ha")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(res.stdout) if d}
    assert "PersistentVolumeClaim" not in docs
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    assert docs["Deployment"]["spec"]["replicas"] == 2
