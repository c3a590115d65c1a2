"""tether: when a session ends, every process that belonged to it dies."""

import os as _os

# gRPC's fork handlers serve processes that use gRPC on both sides of a fork. The agent
# forks only to exec at once (with a tiny preexec step joining a cgroup); with the
# handlers on, that child can crash inside them while other threads talk gRPC.
# Must be set before grpc is imported, hence here.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
