"""After a failover every watcher of a session gets every group again, as new numbered
events of kind `initial` (stored, too), and an exit that happened while no coordinator
led arrives as kind `initial`, never as `exit`. The new leader follows each agent from
scratch (AgentLink.last_seq = 0: Watch with a snapshot, coordinator/agents.py:219), and
absorb() publishes every snapshot item under the agent's kind INITIAL
(coordinator/core.py:226-238; TrackedGroup.absorb returns True even when nothing
changed). README: "events are numbered ... so none is lost or repeated"; EventKind.INITIAL
is "the current state of a group, sent first to a new watcher". A consumer that acts on
`exit` events (alerts, `tether watch` piped to a script) misses that exit.

Run: .venv-test/bin/python -m tests.review3.failover_replays_events
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from tests.review3.harness import cluster, marked


def main() -> int:
    from tether.client import Client

    with cluster("replay") as cl:
        first = cl.coordinator()
        assert cl.wait_leader() is first
        cl.coordinator()
        cl.agent("e1")
        cl.wait_agent_up("e1")
        events: list[Any] = []
        with Client(cl.addresses, failover=60) as c:
            ids = [c.spawn(["sleep", "300"], session="w", agent="e1", grace=1,
                           label=f"n{n}").view.group_id for n in range(3)]

            def watch() -> None:
                try:
                    for ev in c.watch("w", timeout=40):
                        events.append(ev)
                except Exception as exc:
                    events.append(exc)

            t = threading.Thread(target=watch, daemon=True)
            t.start()
            while len(events) < 3:
                time.sleep(0.05)
            snapshot = len(events)
            first.signal(signal.SIGKILL)
            first.proc.wait()
            cl.coordinators.remove(first)
            # The third group ends while nobody leads.
            for pid in marked(ids[2]):
                os.kill(pid, signal.SIGTERM)
            cl.wait_leader()

            def seen(gid: str, ended: bool = False) -> bool:
                return any(not isinstance(e, Exception) and e.group is not None
                           and e.group.view.group_id == gid
                           and (e.group.view.state.ended or not ended)
                           for e in events[snapshot:])

            deadline = time.monotonic() + 30
            while not seen(ids[2], ended=True) and time.monotonic() < deadline:
                time.sleep(0.05)
            # A marker: once its event is here, whatever the new leader made of the
            # agent's snapshot (numbered before it) is here too.
            marker = c.spawn(["sleep", "300"], session="w", agent="e1", grace=1,
                             label="marker").view.group_id
            while not seen(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            after = [e for e in events[snapshot:] if not isinstance(e, Exception)]
            for e in after:
                print(f"  seq {e.seq} kind {e.kind.value:<8} {e.group.view.group_id if e.group else '-'}"
                      f" {e.group.view.state.value if e.group else ''}")
            c.stop("w")
        repeats = [e for e in after if e.kind.value == "initial" and e.group is not None
                   and e.group.view.group_id in ids[:2]]
        exit_kinds = [e.kind.value for e in after if e.group is not None
                      and e.group.view.group_id == ids[2] and e.group.view.state.ended]
        print("unchanged groups sent again:", len(repeats), "; kinds of the third group's end:",
              exit_kinds)
        if repeats or "exit" not in exit_kinds:
            print("DEFECT: the failover repeats every group to watchers and reports an exit "
                  "as `initial`")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
