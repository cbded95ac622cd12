"""Several OpenAI-compatible servers of one model behind one client (``openai.base_urls``).

Which server a request goes to, and what happens when one fails:

* **least outstanding requests**: each request goes to the server with the fewest requests in
  flight (ties: the one that has been sent the fewest so far, then the first listed), so a slow
  server gets fewer requests and a fast one more, without any knowledge of their speeds;
* **a failed request moves**: a retryable failure (connection refused, timeout, 429, 5xx) is
  retried at once on a server it has not failed on yet; only when it has failed on every server
  does it wait (the client's exponential backoff) before going round again;
* **a failing server rests**: after ``failures`` consecutive failures a server is taken out of
  the rotation for ``rest`` seconds; then it gets requests again, and one more failure takes it
  out again. When every server is resting, the one whose rest ends first is used, so requests
  keep being tried (and paced by the backoff) rather than waiting forever;
* **counts**: per server, requests sent, answered and failed, the times it was taken out and its
  last error (`ServerPool.summary`).

The pool is shared by the client's threads; every method holds its lock briefly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection


@dataclass
class Server:
    """One server and what it has done so far."""

    url: str
    index: int
    in_flight: int = 0
    sent: int = 0
    answered: int = 0
    failed: int = 0
    failures_in_a_row: int = 0
    rests: int = 0  # times it was taken out of the rotation
    resting_until: float = 0.0
    last_error: str = ""


class ServerPool:
    """The servers of one model, chosen per request (see the module docstring)."""

    def __init__(self, urls: list[str], *, failures: int = 3, rest: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise ValueError("no server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a server is listed twice: {[u for u in urls if urls.count(u) > 1][0]}")
        self.servers = [Server(url, i) for i, url in enumerate(urls)]
        self.failures = failures
        self.rest = rest
        self.clock = clock
        self._lock = threading.Lock()

    def acquire(self, avoid: Collection[str] = ()) -> Server:
        """The server for the next request, counted as in flight until `release`: the least busy of
        those not resting and not in ``avoid`` (the URLs this request already failed on); failing
        that, of those not in ``avoid``; failing that, of all."""
        with self._lock:
            now = self.clock()
            candidates = ([s for s in self.servers if s.url not in avoid and s.resting_until <= now]
                          or [s for s in self.servers if s.url not in avoid] or self.servers)
            awake = [s for s in candidates if s.resting_until <= now]
            if awake:
                server = min(awake, key=lambda s: (s.in_flight, s.sent, s.index))
            else:  # every candidate rests: the one back first
                server = min(candidates, key=lambda s: (s.resting_until, s.in_flight, s.index))
            server.in_flight += 1
            server.sent += 1
            return server

    def release(self, server: Server, error: str | None = None) -> None:
        """The request sent to ``server`` is over: answered (``error`` None) or failed with ``error``."""
        with self._lock:
            server.in_flight -= 1
            if error is None:
                server.answered += 1
                server.failures_in_a_row = 0
                return
            server.failed += 1
            server.failures_in_a_row += 1
            server.last_error = error
            if server.failures_in_a_row >= self.failures and server.resting_until <= self.clock():
                server.resting_until = self.clock() + self.rest
                server.rests += 1

    def untried(self, avoid: Collection[str]) -> bool:
        """Whether a server not in ``avoid`` is awake: a failed request can move on at once."""
        with self._lock:
            now = self.clock()
            return any(s.url not in avoid and s.resting_until <= now for s in self.servers)

    def summary(self) -> list[str]:
        """A line per server: requests sent, answered, failed, times taken out, last error."""
        with self._lock:
            return [f"{s.url}: {s.sent} requests, {s.answered} answered, {s.failed} failed"
                    + (f", taken out {s.rests}×" if s.rests else "")
                    + (f"; last error: {s.last_error[:160]}" if s.last_error else "") for s in self.servers]
