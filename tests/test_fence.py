"""The agent's fence (agent/fence.py), from the third hostile review: a coordinator's
mutating call without an epoch once the agent obeys one, two holders of one epoch, an
epoch file that is not a regular file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.plugins.creds import Tokens
from tests.plugins.processes import start_daemon, stop_daemon
from tether.agent.fence import Fence
from tether.core.errors import Fenced, NotFound, TetherError


async def test_a_second_holder_of_the_obeyed_epoch_is_refused(tmp_path: Path) -> None:
    """review3 restored_store_two_leaders: agents fenced on the number alone, so two
    leaders with one epoch (a restored database) were both obeyed."""
    path = tmp_path / "epoch.json"
    fence = Fence("a1", path)
    await fence.admit(3, "holder-b")
    await fence.admit(3, "holder-b")
    with pytest.raises(Fenced):
        await fence.admit(3, "holder-c")
    await fence.admit(4, "holder-c")  # the one the store names moved above it
    with pytest.raises(Fenced):
        await fence.admit(3, "holder-b")
    assert json.loads(path.read_text()) == {"epoch": 4, "holder": "holder-c"}
    again = Fence("a1", path)
    assert (again.newest, again.holder) == (4, "holder-c")
    with pytest.raises(Fenced):
        await again.admit(4, "holder-d")


async def test_a_call_that_does_not_say_its_holder_is_refused_once_the_holder_is_known(
        tmp_path: Path) -> None:
    """review6 fence_holder_collisions: with the obeyed epoch and no holder header, a call
    (a coordinator too old to send it, or one that hides) was obeyed although the agent
    knew that epoch's holder; and ids were cut to 64 characters, so two holders on a host
    with a long name looked alike."""
    from tether.agent.fence import _holder_of

    fence = Fence("a1", tmp_path / "epoch.json")
    await fence.admit(2)  # no holder known yet: obeyed
    await fence.admit(2, "holder-b")  # the first that says who it is is remembered
    with pytest.raises(Fenced):
        await fence.admit(2)
    host = "h" * 60
    one, two = (_holder_of([("tether-leader-id", f"{host}:{pid}:abc")]) for pid in (1, 2))
    assert one != two and len(one) <= 64 and len(two) <= 64


def test_an_epoch_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """review3 epoch_fifo_hangs_agent: opening a FIFO blocked the agent's start forever."""
    path = tmp_path / "epoch.json"
    os.mkfifo(path)
    with pytest.raises(ValueError, match="not a regular file"):
        Fence("a1", path)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_coordinators_mutating_call_without_an_epoch_is_refused_once_one_is_obeyed(
        tmp_path: Path) -> None:
    """review3 unfenced_restart: a call without the epoch header was let through unfenced,
    so whatever sent no header (a deposed leader's Restart) was obeyed."""
    from tether.coordinator.grpc_agent import GrpcAgentClient

    tokens = Tokens(tmp_path / "tokens")
    coordinator = tokens.add("coordinator")
    state = tmp_path / "agent"
    state.mkdir()
    (state / "coordinator-epoch-f1.json").write_text('{"epoch": 5, "holder": "h"}')
    d = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", "127.0.0.1:1",
                               "--name", "f1", "--state-dir", str(state),
                               "--token-file", tokens.file()], state)
    try:
        bare = GrpcAgentClient("f1", d.address, coordinator)
        fenced = GrpcAgentClient("f1", d.address, coordinator, epoch=lambda: 5, holder="h")
        try:
            with pytest.raises(TetherError, match="must carry tether-epoch"):
                await bare.restart("g-000000000001", None, timeout=10)
            with pytest.raises(TetherError, match="must carry tether-epoch"):
                await bare.forget(["g-000000000001"], timeout=10)
            with pytest.raises(NotFound):  # a read needs no epoch
                await bare.get("g-000000000001", timeout=10)
            with pytest.raises(NotFound):  # with the epoch: let through, to the group
                await fenced.restart("g-000000000001", None, timeout=10)
        finally:
            await bare.close()
            await fenced.close()
    finally:
        stop_daemon(d)
