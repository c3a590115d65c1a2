"""Write-behind with acknowledgements: batch changes, write them elsewhere, never lose one.

Both daemons persist the same way. Changes made in one event-loop turn are written
together (a 1000-group stop must not cost 2000 commits), by a coroutine that hands
the batch to the store (its own thread, or an async driver); ``durable()`` returns
once every change put so far is written, so a caller acknowledges only what is on
disk. A failed write keeps the batch (a later change of the same key replaces it),
is reported through ``on_error`` and retried with capped backoff; whoever waits on
``durable()`` gets ``StateUnwritable`` at their deadline, with the store's error.
``on_written`` sees each batch once it is written (what may now be told to others);
``abandon`` gives up (the writer lost the right to write): waiters get its error.
A store that refuses some rows for good (``RowsRefused``: data it cannot hold) gets
those dropped (logged) and the rest retried at once: one bad row must not wedge every
later batch. ``failing_since`` says since when writes fail (the leader steps down when
it cannot write for long).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

from tether.core.errors import StateUnwritable

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

RETRY_FIRST = 0.1
RETRY_MAX = 5.0


class RowsRefused(Exception):
    """The store refuses these keys' values for good (why, per key); nothing was written."""

    def __init__(self, refused: Mapping[object, str]) -> None:
        self.refused = dict(refused)
        super().__init__("; ".join(f"{k}: {why}" for k, why in list(self.refused.items())[:3]))


class WriteBehind(Generic[K, V]):
    def __init__(self, write: Callable[[Mapping[K, V]], Awaitable[None]], *, where: str,
                 on_error: Callable[[], None] = lambda: None,
                 on_written: Callable[[Mapping[K, V]], None] = lambda batch: None) -> None:
        self._write = write
        self.where = where
        self.on_error = on_error
        self.on_written = on_written
        self._abandoned: BaseException | None = None
        self._pending: dict[K, tuple[int, V]] = {}
        self._version = 0
        self._written = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.last_error = ""
        #: ``time.monotonic()`` of the first failed write since the last success.
        self.failing_since: float | None = None
        #: The last write's error (None after a success).
        self.last_exception: BaseException | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def put(self, key: K, value: V) -> None:
        """Queue a change; a later one with the same key replaces it."""
        if self._abandoned is not None:
            return  # nothing more is written: the writer lost its right to write
        self._version += 1
        self._pending[key] = (self._version, value)
        self._schedule()

    def _schedule(self) -> None:
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (closing): drain() writes what is left
            self._task = loop.create_task(self._loop(), name=f"write-behind {self.where}")

    async def durable(self, timeout: float) -> None:
        if self._abandoned is not None:
            raise self._abandoned
        target = self._version
        if self._written >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._schedule()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            raise StateUnwritable(self.where, self.last_error or "the write did not finish "
                                  f"within {timeout:g} s") from None

    async def _loop(self) -> None:
        backoff = RETRY_FIRST
        await asyncio.sleep(0)  # let the rest of this loop turn's changes join the batch
        while self._pending:
            batch = dict(self._pending)
            upto = self._version  # every change up to here is in the batch or written
            try:
                await self._write({k: v for k, (_, v) in batch.items()})
            except asyncio.CancelledError:
                raise
            except RowsRefused as exc:
                dropped = [k for k in batch if k in exc.refused]
                for key in dropped:
                    if self._pending.get(key, (0, None))[0] == batch[key][0]:
                        del self._pending[key]
                log.error("%s refuses %d change(s) for good (dropped; the rest is retried): "
                          "%s", self.where, len(dropped), exc)
                self.on_error()
                if not dropped:  # nothing of this batch: a store error like any other
                    self.last_error = str(exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
                    continue
                if not self._pending:
                    self._written = upto
                    self._release(upto)
                continue
            except Exception as exc:  # the store's error, whatever it is: keep the data
                self.last_error = str(exc) or type(exc).__name__
                self.last_exception = exc
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self.on_error()
                log.error("cannot write %s: %s; keeping %d change(s), retrying in %.1f s",
                          self.where, self.last_error, len(batch), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            self.last_error = ""
            self.last_exception = None
            self.failing_since = None
            backoff = RETRY_FIRST
            for key, (version, _) in batch.items():
                if self._pending.get(key, (0, None))[0] == version:
                    del self._pending[key]
            self._written = upto
            try:
                self.on_written({k: v for k, (_, v) in batch.items()})
            except Exception:
                log.exception("%s: after a write", self.where)
            self._release(upto)

    def _release(self, upto: int) -> None:
        done = [f for t, f in self._waiters if t <= upto]
        self._waiters = [(t, f) for t, f in self._waiters if t > upto]
        for fut in done:
            if not fut.done():
                fut.set_result(None)

    def abandon(self, error: BaseException) -> None:
        """Write nothing more: drop what is pending, fail every waiter with ``error``."""
        self._abandoned = error
        if self._task is not None:
            self._task.cancel()
        self._pending.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: a waiter that timed out already is not an error
        self._waiters = []

    async def drain(self) -> None:
        """One last write of what is pending (shutdown); an error is logged, not raised."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending:
            try:
                await self._write({k: v for k, (_, v) in self._pending.items()})
                self._pending.clear()
            except Exception as exc:
                log.error("%s: %d change(s) could not be written at shutdown: %s", self.where,
                          len(self._pending), exc)
