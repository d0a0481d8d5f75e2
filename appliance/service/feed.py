"""What followers see of a run, and the handle the service keeps on a run it is driving."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from appliance.jobs.runner import Job
from appliance.service.caller import Caller
from appliance.service.record import RunState


class RunFeed:
    """What a follower sees of one run: its events in order, and the latest progress.

    Progress is not kept step by step: a follower wants the bar where it is now, so the feed
    holds only the newest progress event and a counter that says it changed.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.progress: dict[str, Any] | None = None
        self.progress_seq = 0
        self.done = False
        self._cond = threading.Condition()

    def push(self, event: dict[str, Any]) -> None:
        with self._cond:
            if event["event"] == "progress":
                self.progress = event
                self.progress_seq += 1
            else:
                self.events.append(event)
                if event["event"] == "run_finished":
                    self.done = True
            self._cond.notify_all()

    def follow(self, since: int = 0, *, heartbeat_s: float = 5.0) -> Iterator[dict[str, Any]]:
        """Yield events from index ``since`` (and fresh progress) until the run finishes.

        Each event carries its index as ``seq``, so a follower that reconnects can pass
        ``since`` and miss nothing; a heartbeat every ``heartbeat_s`` keeps idle streams alive.
        """
        index, seen_progress = since, -1
        while True:
            with self._cond:
                if index >= len(self.events) and self.progress_seq == seen_progress and not self.done:
                    self._cond.wait(timeout=heartbeat_s)
                batch = self.events[index:]
                progress = self.progress if self.progress_seq != seen_progress else None
                seen_progress = self.progress_seq
                finished = self.done
            for offset, event in enumerate(batch):
                yield {**event, "seq": index + offset}
            index += len(batch)
            if finished and not batch:
                return
            if progress is not None and not finished:
                yield progress
            elif not batch and not finished:
                yield {"event": "heartbeat"}


class ActiveRun:
    """A run the service is driving (or about to)."""

    def __init__(self, state: RunState, caller: Caller) -> None:
        self.state, self.caller = state, caller
        self.feed = RunFeed()
        self.cancel_requested = False
        self.cancelled_by: str | None = None
        self.job: Job | None = None
        self.lock = threading.Lock()

    def set_job(self, job: Job | None) -> None:
        with self.lock:
            self.job = job
            if job is not None and self.cancel_requested:
                job.cancel()

    def cancel(self, by: str) -> None:
        with self.lock:
            self.cancel_requested = True
            self.cancelled_by = self.cancelled_by or by
            if self.job is not None:
                self.job.cancel()
