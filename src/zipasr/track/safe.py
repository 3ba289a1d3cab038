"""Guarded MLflow access: a failing tracking backend is a warning, never a failed run."""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("zipasr.track")

T = TypeVar("T")


# MLflow's HTTP limits, unless the user set them: its defaults (7 retries, backoff factor 2,
# 120 s timeout) keep one call to a dead server retrying for ~4 minutes even when every
# connection is refused (sleeps 4+8+16+32+64+120 s), ~20 minutes when the server is frozen.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 1,      # one retry: a blip is not an outage
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1,
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": 1.0,  # MLflow's default, used in the bound
               "MLFLOW_HTTP_REQUEST_TIMEOUT": 15}         # s, per connect and per read
PROBE_TIMEOUT = 5.0      # s: the /health probe before a run and before reconnecting
RECONNECT_FIRST = 10.0   # s after an outage before the first reconnection probe
RECONNECT_MAX = 300.0    # the wait doubles after every failed probe, up to this


def _not_a_retry(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Retrying (")


def limit_http_retries() -> None:
    """MLflow retries HTTP calls for minutes by default; a training job must not stall on a
    tracking server that went away. Explicit user settings win."""
    for k, v in HTTP_LIMITS.items():
        os.environ.setdefault(k, str(v))
    # urllib3 warns at every retry of MLflow's; the guard's one warning says it all (the
    # process's only urllib3 user is MLflow)
    pool = logging.getLogger("urllib3.connectionpool")
    if _not_a_retry not in pool.filters:
        pool.addFilter(_not_a_retry)


def failed_call_bound() -> float:
    """Worst-case seconds one MLflow HTTP call to a dead or frozen server takes before it
    raises, under the limits in effect (DNS resolution aside): ``retries + 1`` attempts, each a
    connect and a read of up to the timeout, plus urllib3's sleeps between attempts (none before
    the first retry, ``factor * 2**(i-1) + jitter`` before retry ``i >= 2``, at most 120 s)."""
    from urllib3.util.retry import Retry

    def get(k: str) -> float:
        return float(os.environ.get(k, HTTP_LIMITS[k]))

    retries = int(get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))
    factor, jitter = get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"), get(
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")
    sleeps = sum(min(Retry.DEFAULT_BACKOFF_MAX, factor * 2 ** (i - 1) + jitter)
                 for i in range(2, retries + 1))
    return (retries + 1) * 2 * get("MLFLOW_HTTP_REQUEST_TIMEOUT") + sleeps


def probe(uri: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when ``uri`` looks usable, else why not. Only HTTP servers are probed (their
    ``/health`` endpoint, one short request, no retries); local backends are checked on use."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                return f"health check returned HTTP {r.status}"
    except (OSError, urllib.error.URLError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


class Guard:
    """Runs tracking calls; the first failure logs one warning and disables all later calls,
    until :meth:`rearm` (a tracker that finds the server back). ``hint``, called at the first
    failure, says what is lost and how to recover."""

    def __init__(self, what: str = "MLflow tracking",
                 hint: Callable[[], str] | None = None) -> None:
        self.what = what
        self.hint = hint
        self.enabled = True
        self.failure: str | None = None
        self.outages = 0                     # times disabled
        self.disabled_at: float | None = None  # time.monotonic() of the last disabling
        self.lost_seconds = 0.0              # spent in calls that failed

    def disable(self, why: str) -> None:
        if self.enabled:
            self.outages += 1
            self.disabled_at = time.monotonic()
            if self.outages == 1:  # said once: a flapping server must not flood the log
                hint = f". {self.hint()}" if self.hint else ""
                log.warning("%s disabled, the run continues without it: %s%s", self.what, why,
                            hint)
            else:
                log.info("%s disabled again: %s", self.what, why)
        self.enabled = False
        self.failure = why

    def rearm(self) -> None:
        self.enabled = True

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        if not self.enabled:
            return None
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # any backend error: tracking must not end the run
            took = time.monotonic() - t0
            self.lost_seconds += took
            self.disable(f"{getattr(fn, '__name__', 'call')}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''} "
                         f"(gave up after {took:.1f} s)")
            return None
