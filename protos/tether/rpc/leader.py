"""The metadata coordinators, agents and clients exchange about leadership.

* ``tether-epoch`` (request header): the leader's epoch, on every call a coordinator
  makes to an agent. An agent refuses calls from an epoch older than the newest it has
  obeyed (``FAILED_PRECONDITION``), with ``tether-fence: NEWEST`` in the trailers.
* ``tether-leader-id`` (request header, with ``tether-epoch``): the leader's lease
  holder (a random id per term). Two leaders with one epoch (a database restored
  without its newest leader row) are told apart: an agent that obeys epoch N of one
  holder refuses epoch N of another, and whichever the store still names moves above.
* ``tether-leader`` (trailer of an ``UNAVAILABLE``): the leader's address as the
  coordinator that answered knows it (empty: none leads right now). A standby answers
  so instead of serving the call; a leader that stepped down mid-call too, with
  ``tether-interrupted: 1`` (the call may have been partly done).
* ``tether-agent-unreachable`` (trailer of an ``UNAVAILABLE``): the leader answered, but
  the agent the call needed did not: the client reports that and does not go looking
  for another coordinator.
* ``tether-stale-ok: 1`` (request header of a read): the client could not reach the
  leader; a standby may answer from the store (at most a second old).

Clients (the SDK, the CLI, agents registering) follow ``tether-leader``; given several
coordinator addresses they also try the others when one does not answer.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Any

EPOCH_HEADER = "tether-epoch"
HOLDER_HEADER = "tether-leader-id"
FENCE_TRAILER = "tether-fence"
LEADER_TRAILER = "tether-leader"
INTERRUPTED_TRAILER = "tether-interrupted"
AGENT_TRAILER = "tether-agent-unreachable"
#: Request header of a read a client may have answered from the store by a standby
#: (it could not reach the leader): without it, a standby sends reads to the leader too,
#: so a client reads what it just wrote.
STALE_OK_HEADER = "tether-stale-ok"
#: The reads a standby answers from the store (with ``STALE_OK_HEADER``).
READS = frozenset({"GetSession", "ListSessions", "ListAgents"})

#: Set while serving a call that a standby turned away: the audit log skips it (nothing
#: was done here; the leader audits the call when the client makes it there).
REDIRECTED: contextvars.ContextVar[bool] = contextvars.ContextVar("tether_redirected",
                                                                  default=False)


def addresses(text: str) -> list[str]:
    """``a:7400,b:7400`` (spaces allowed) to a list, without duplicates, in order."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out


def trailer(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return None


def redirect_of(exc: Any) -> tuple[bool, str, bool]:
    """From a failed call (``grpc.aio.AioRpcError``): (a coordinator answered that it does
    not lead, the leader's address if known, the call was interrupted mid-way)."""
    try:
        md = exc.trailing_metadata()
    except Exception:  # no trailers (the call never reached a server)
        return False, "", False
    leader = trailer(md, LEADER_TRAILER)
    if leader is None:
        return False, "", False
    return True, leader, trailer(md, INTERRUPTED_TRAILER) == "1"
