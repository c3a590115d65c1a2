"""Metrics: names are a contract, values match what happened, promtool accepts every
endpoint, and a real Prometheus scrapes a real agent."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.common import require_binary
from tests.plugins.processes import Daemon, free_port, start_daemon, stop_daemon, wait_until


def scrape(address: str) -> str:
    return str(urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode())


def value(text: str, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, number = line.rpartition(" ")
        if metric.split("{")[0] == name and all(w in metric for w in want):
            return float(number)
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    mport = free_port()
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"m-{tmp_path.name[-8:]}", "--metrics-listen",
                               f"127.0.0.1:{mport}"], tmp_path)
    try:
        yield d, f"127.0.0.1:{mport}"
    finally:
        stop_daemon(d)


def test_values_match_what_happened(agent: tuple[Daemon, str]) -> None:
    d, m = agent
    before = scrape(m)
    assert value(before, "tether_cleanups_total", result="forced") == 0
    assert value(before, "tether_start_failures_total", reason="command_not_found") == 0

    d.cli("spawn", "--session", "s", "--grace", "0.3", "--", "sh", "-c",
          "trap '' TERM; sleep 100", check=True)
    d.cli("spawn", "--session", "s", "--", "sleep", "100", check=True)
    assert d.cli("spawn", "--session", "s", "--", "no-such-binary").returncode == 1
    running = scrape(m)
    assert value(running, "tether_groups", state="running", containment="cgroup") + \
        value(running, "tether_groups", state="running", containment="subreaper") == 2
    assert value(running, "tether_groups", state="failed") >= 1
    assert d.cli("stop", "s").returncode == 0

    after = scrape(m)
    assert value(after, "tether_cleanups_total", result="forced") == 1
    assert value(after, "tether_cleanups_total", result="success") == 1
    assert value(after, "tether_cleanups_total", result="failed") == 0
    assert value(after, "tether_start_failures_total", reason="command_not_found") == 1
    assert value(after, "tether_cleanup_duration_seconds_count") == 2
    assert value(after, "tether_signals_total", signaller="local", signal="SIGKILL") >= 1
    assert value(after, "tether_session_stops_total", result="clean") == 1
    assert value(after, "tether_fanout_duration_seconds_count", operation="stop") == 1
    assert value(after, "tether_agents", state="up") == 1
    assert value(after, "tether_sessions", state="stopped") == 1


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool", "prometheus")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)


def test_promtool_accepts_serve_agent_and_coordinator_endpoints(
        agent: tuple[Daemon, str], tmp_path: Path) -> None:
    d, m = agent
    d.cli("spawn", "--session", "p", "--", "sleep", "100", check=True)
    d.cli("stop", "p", check=True)
    res = promtool_check(scrape(m))
    assert res.returncode == 0, res.stdout + res.stderr

    cport, aport = free_port(), free_port()
    c = start_daemon("coordinator", ["--listen", "127.0.0.1:0", "--state-dir",
                                     str(tmp_path / "c"), "--metrics-listen",
                                     f"127.0.0.1:{cport}"], tmp_path, name="c")
    try:
        a = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", c.address,
                                   "--name", f"pa-{tmp_path.name[-6:]}", "--state-dir",
                                   str(tmp_path / "a"), "--metrics-listen",
                                   f"127.0.0.1:{aport}"], tmp_path, name="a")
        try:
            for port in (cport, aport):
                res = promtool_check(scrape(f"127.0.0.1:{port}"))
                assert res.returncode == 0, res.stdout + res.stderr
        finally:
            stop_daemon(a)
    finally:
        stop_daemon(c)


@pytest.mark.prometheus
@pytest.mark.slow
def test_real_prometheus_scrapes_cleanups_and_orphans(agent: tuple[Daemon, str],
                                                      tmp_path: Path) -> None:
    prometheus = require_binary("prometheus", "prometheus")
    d, m = agent
    d.cli("spawn", "--session", "q", "--grace", "0.2", "--", "sh", "-c",
          "trap '' TERM; sleep 100", check=True)
    d.cli("stop", "q")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: tether-agent\n"
        f"    static_configs:\n      - targets: ['{m}']\n")
    proc = subprocess.Popen([prometheus, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(q: str) -> list[dict[str, object]]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                return []
            result: list[dict[str, object]] = body["data"]["result"]
            return result

        forced = 'tether_cleanups_total{result="forced"}'
        wait_until(lambda: bool(query(forced)), 60, "prometheus to scrape the agent")
        (sample,) = query(forced)
        assert float(sample["value"][1]) == 1  # type: ignore[index]
        (orphans,) = query("tether_orphans")
        assert float(orphans["value"][1]) == 0  # type: ignore[index]
        (up,) = query('up{job="tether-agent"}')
        assert float(up["value"][1]) == 1  # type: ignore[index]
    finally:
        proc.terminate()
        proc.wait(30)
