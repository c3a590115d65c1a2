"""The Python SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio) for a tether
coordinator, typed values in and out (``tether.core``), errors as exceptions.

    from tether.client import Client

    with Client("127.0.0.1:7400") as c:
        g = c.spawn(["python3", "-m", "http.server", "8000"], session="web",
                    ready="tcp:8000", label="web")
        report = c.stop("web")
        assert report.clean
"""

from tether.client.aio import (
    AsyncClient,
    Attachment,
    CoordinatorUnreachable,
    Interrupted,
    Leader,
    TimedOut,
)
from tether.client.lease import AsyncWindow, LeaseLost
from tether.client.spec import build_spec
from tether.client.sync import Client, Window

__all__ = ["AsyncClient", "AsyncWindow", "Attachment", "Client", "CoordinatorUnreachable",
           "Interrupted", "Leader", "LeaseLost", "TimedOut", "Window", "build_spec"]
