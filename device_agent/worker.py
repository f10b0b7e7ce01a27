"""Where the agent's deployment work runs: signature checks, chunk writes, segment assembly,
model verification, swaps and health probes — never inside the MQTT client's callbacks.

A board runs one agent with a `ThreadWorker`: one thread, one bounded queue, and a desired
state waiting in it is replaced by a newer one. The simulator runs a thousand agents in one
thread with an `InlineWorker`, which runs each job at once in the caller's thread (its
event loop), so the simulated fleet still runs the real agent code.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)
Job = Callable[[], None]


class Worker(Protocol):
    def submit(self, job: Job, key: str | None = None) -> bool:
        """Queue `job`; one still waiting with the same `key` is dropped for it. False when
        the queue is full and `job` was dropped."""

    @property
    def depth(self) -> int:
        """Jobs waiting."""

    def stop(self) -> None:
        """Run nothing more; return once the job in progress (if any) has ended."""


class InlineWorker:
    """Runs each job at once, in the thread that submits it."""

    depth = 0

    def submit(self, job: Job, key: str | None = None) -> bool:
        job()
        return True

    def stop(self) -> None:
        pass


class ThreadWorker:
    """One daemon thread running jobs in order from a queue of at most `maxsize`."""

    def __init__(self, maxsize: int = 256, name: str = "agent-worker") -> None:
        self.maxsize = maxsize
        self._jobs: deque[tuple[str | None, Job]] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job, key: str | None = None) -> bool:
        with self._cond:
            if self._stopped:
                return False
            if key is not None:  # the newest wins, at the back: after what came before it
                for item in self._jobs:
                    if item[0] == key:
                        self._jobs.remove(item)
                        break
            if len(self._jobs) >= self.maxsize:
                return False
            self._jobs.append((key, job))
            self._cond.notify()
            return True

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._jobs.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                _, job = self._jobs.popleft()
            try:
                job()
            except Exception:  # the agent guards its jobs; this keeps the thread alive anyway
                log.exception("agent job failed")
