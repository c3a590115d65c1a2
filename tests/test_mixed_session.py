"""One session stop covering local, docker and ssh groups at once, through `tether serve`.

Every target runs on this machine (the container shares the host kernel, sshd is
on 127.0.0.1), so the TETHER_GROUP marker finds what is left of each group
independently of tether's own report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.processes import Daemon, marked_alive, start_daemon, stop_daemon, wait_until

ESCAPEE_TREE = ["sh", "-c", "setsid sh -c 'trap \"\" TERM; sleep 300; true' & sleep 300"]


@pytest.fixture
def serve_everywhere(tmp_path: Path, docker_engine: Any, sshd: Any) -> Iterator[Daemon]:
    opts = [f"known_hosts={sshd.known_hosts}", f"ssh_key={sshd.client_key}",
            f"docker_host={docker_engine.url}"]
    args = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
            "--agent-name", f"mixed-{tmp_path.name[-8:]}"]
    for o in opts:
        args += ["--signaller-option", o]
    d = start_daemon("serve", args, tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.slow
def test_one_stop_ends_local_docker_and_ssh_groups(serve_everywhere: Daemon,
                                                   docker_engine: Any, sshd: Any) -> None:
    d = serve_everywhere
    container = docker_engine.run()
    targets = {"local": "local", "docker": f"docker:{container.name}",
               "ssh": f"ssh:{sshd.where}"}
    groups = {}
    for label, target in targets.items():
        res = d.cli("spawn", "--session", "mixed", "--label", label, "--target", target,
                    "--grace", "1", "--env", "PATH=/usr/bin:/bin", "--", *ESCAPEE_TREE)
        assert res.returncode == 0, f"{label}: {res.stderr}"
        groups[label] = res.stdout.strip()
    for label, gid in groups.items():
        wait_until(lambda gid=gid: len(marked_alive(gid)) >= 3, 20, f"{label} tree to start")

    res = d.cli("stop", "mixed", "-o", "json", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    import json

    report = json.loads(res.stdout)
    by_label = {g["label"]: g for g in report["groups"]}
    assert set(by_label) == set(targets)
    for label, g in by_label.items():
        assert g["target"] == targets[label]
        assert g["reason"] == "forced_kill", g  # the escapee ignores TERM
        assert g["survivors"] == 0
        assert marked_alive(groups[label]) == [], f"{label}: members survived"
    top = container.top()["Processes"]
    assert len(top) == 1 and "sleep 1000000" in top[0][-1], top
