"""The shared kernel: the lifecycle model, errors, events and task ownership.

Imports nothing of gRPC, Docker or SSH; the agent, the coordinator, the
signallers and the clients all speak these types.
"""
