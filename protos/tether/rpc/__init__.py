"""RPC plumbing shared by every daemon and client: server set-up, security,
status mapping, protobuf <-> domain conversion."""
