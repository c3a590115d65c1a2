"""Run inside a private PID namespace (`unshare -p -f --mount-proc`): a detached group whose
leader pid is then taken by an unrelated session leader. Prints one JSON line.

    python -m tests.adversarial.pidreuse_scenario CONTAINMENT

The group: `sh -c 'setsid sleep 300 & exec sleep 300'` (leader L = the exec'd sleep; its
child leaves the session). The leader is killed from outside, so the group runs on,
detached. Then /proc/sys/kernel/ns_last_pid steers the next fork to pid L: a stranger
`sh -c 'sleep 300 & sleep 300'` in a new session becomes session leader L, its children have
sid L and pgid L. Stopping the group must end the group's member and nothing of the
stranger's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from tests.plugins.processes import make_authority
from tether.core.model import GroupSpec, GroupState, StopPolicy
from tether.signallers import procfs


def take_pid(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a session leader that gets ``pid`` (this namespace hands out pids
    in order)."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                             env={"PATH": os.environ["PATH"]})
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    table = sorted((p.pid, p.ppid, p.pgid, p.sid, p.state, p.comm)
                   for p in procfs.snapshot().values())
    raise SystemExit(f"could not steer a fork to pid {pid}; processes: {table}")


async def scenario(containment: str) -> dict[str, object]:
    authority, signallers = await make_authority(f"reuse-{containment}", containment)
    try:
        spec = GroupSpec(argv=("sh", "-c", "setsid sleep 300 & exec sleep 300"),
                         stop=StopPolicy(grace=2))
        view = await authority.spawn(spec)
        leader = view.leader_pid
        # Let the scan see the child while its parent is the leader (proof by descent).
        for _ in range(200):
            if await authority.member_count(view.group_id) >= 2:
                break
            await asyncio.sleep(0.01)
        members = await authority.find(view.group_id).handle.members()  # type: ignore[union-attr]
        child = next(p for p in members if p != leader)
        handle = authority.find(view.group_id).handle
        assert handle is not None
        os.kill(leader, signal.SIGKILL)  # nobody in tether sent this: the group runs on
        await handle.wait_leader()  # reaped by the agent: its number is free
        stranger = take_pid(leader, ["sh", "-c", "sleep 300 & sleep 300"])
        for _ in range(1000):  # the stranger's shell forks its two sleeps
            if len([p for p in procfs.snapshot().values() if p.sid == leader and p.alive]) > 2:
                break
            await asyncio.sleep(0.01)
        strangers = sorted(p.pid for p in procfs.snapshot().values()
                           if p.sid == leader and p.alive)
        before = authority.get(view.group_id).state
        stopped = await authority.stop(view.group_id)
        result = {
            "leader": leader, "child": child, "stranger": stranger.pid,
            "state_before_stop": before.value,
            "state": stopped.state.value, "survivors": stopped.exit.survivors if stopped.exit
            else None,
            "child_alive": procfs.alive(child),
            "strangers": strangers,
            "strangers_alive": [procfs.alive(p) for p in strangers],
        }
        stranger.kill()
        for p in strangers:
            if procfs.alive(p):
                os.kill(p, signal.SIGKILL)
        stranger.wait()
        return result
    finally:
        await authority.stop_all()
        await authority.shutdown()
        await signallers.aclose()


if __name__ == "__main__":
    out = asyncio.run(scenario(sys.argv[1]))
    assert out["state_before_stop"] == GroupState.RUNNING.value
    print(json.dumps(out), flush=True)
