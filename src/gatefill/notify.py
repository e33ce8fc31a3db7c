"""Notices to people: a gate waiting for approval, a soak verdict that changed, a run that failed or paused, a watched
check that changed verdict, posted as Slack-compatible JSON to the webhook ``[notify]`` names.

Phases and commands build a ``Notice`` with one of the small constructors below and hand it to :func:`send`; they never
format the message. Delivery happens in a daemon thread fed by a bounded queue: retried with backoff, every failure
logged in one line (never with the URL: a webhook URL is a secret), and never blocking or failing the run. A command
wraps its work in :func:`notifying`, which starts the thread when ``[notify]`` is configured and, at the end, waits at
most ``NOTIFY_FLUSH_SECONDS`` for what is still queued. Without ``[notify]`` (or with its variable unset: one warning
line at start) :func:`send` does nothing.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from gatefill.config import NOTIFY_FLUSH_SECONDS, NOTIFY_QUEUE_SIZE, NotifySettings

__all__ = [
    "Notice",
    "Notifier",
    "gate_waiting",
    "notifying",
    "run_failed",
    "run_paused",
    "send",
    "slack_body",
    "soak_verdict_changed",
    "watch_verdict_changed",
]

log = logging.getLogger("gatefill.notify")


@dataclass(frozen=True)
class Notice:
    """One thing a person should hear about: its kind (``config.NOTICE_KINDS``), where, which run, a title, a line of
    text, and the console page it concerns (a path such as ``/env/staging/runs/ID``; the notifier prefixes
    ``[notify] console_url``)."""

    kind: str
    env: str
    run_id: str | None
    title: str
    text: str
    link: str | None = None


def _run_path(env: str, run_id: str, suffix: str = "") -> str:
    return f"/env/{quote(env, safe='')}/runs/{quote(run_id, safe='')}{suffix}"


def gate_waiting(env: str, run_id: str, gate: str, *, page: str | None = None) -> Notice:
    """Run ``run_id`` waits at ``gate`` for a person's approval; ``page`` defaults to the run's page (the plan's
    page for the plan gate)."""
    link = page or _run_path(env, run_id, "/plan" if gate == "plan" else "")
    text = f"approve it in the console or with `gatefill approve {run_id} --gate {gate} --by NAME --env {env}`"
    return Notice("gate_waiting", env, run_id, f"{env}: the {gate} gate of {run_id} waits for approval", text, link)


def run_paused(env: str, run_id: str, reason: str) -> Notice:
    """Run ``run_id`` stopped before its end and can be resumed."""
    return Notice("run_paused", env, run_id, f"{env}: run {run_id} paused", reason, _run_path(env, run_id))


def run_failed(env: str, run_id: str, reason: str) -> Notice:
    """Run ``run_id`` ended with a FAIL (failed sessions, a failed gate, a failed soak)."""
    return Notice("run_failed", env, run_id, f"{env}: run {run_id} failed", reason, _run_path(env, run_id))


def soak_verdict_changed(env: str, run_id: str, look: int, before: str, after: str, detail: str) -> Notice:
    """The soak's verdict at look ``look`` differs from the look before."""
    title = f"{env}: soak {run_id} went from {before} to {after} at look {look}"
    return Notice("soak_verdict", env, run_id, title, detail, _run_path(env, run_id))


def watch_verdict_changed(env: str, set_name: str, check: str, before: str, after: str, summary: str) -> Notice:
    """A watched check's verdict differs from the one recorded before it."""
    title = f"{env}: {check} ({set_name} watch) went from {before} to {after}"
    return Notice("watch_verdict", env, None, title, summary, f"/env/{quote(env, safe='')}/watch")


def slack_body(notice: Notice, console_url: str | None) -> dict[str, Any]:
    """The Slack-compatible JSON of ``notice``: ``text`` (what every receiver shows) and ``blocks``."""
    link = f"{console_url}{notice.link}" if console_url and notice.link else None
    text = f"{notice.title}\n{notice.text}" + (f"\n{link}" if link else "")
    context = " · ".join(p for p in (notice.kind, notice.env, notice.run_id) if p)
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{notice.title}*\n{notice.text}"}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
    ]
    if link:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"<{link}|Open in the gatefill console>"}})
    return {"text": text, "blocks": blocks}


class Notifier:
    """Posts notices to one webhook from a daemon thread: :meth:`post` never waits, :meth:`close` waits a bounded
    time for the queue to drain."""

    def __init__(self, url: str, settings: NotifySettings, *, queue_size: int = NOTIFY_QUEUE_SIZE) -> None:
        self._url = url
        self.settings = settings
        self._queue: queue.Queue[Notice | None] = queue.Queue(maxsize=queue_size)
        self._closing = threading.Event()
        self.delivered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="gatefill-notify", daemon=True)
        self._thread.start()

    def post(self, notice: Notice) -> None:
        """Queues ``notice`` unless its kind is filtered out; a full queue drops it with a log line."""
        if notice.kind not in self.settings.events:
            return
        try:
            self._queue.put_nowait(notice)
        except queue.Full:
            log.warning("notify: queue full, %s notice for %s dropped", notice.kind, notice.env)

    def close(self, timeout: float = NOTIFY_FLUSH_SECONDS) -> None:
        """Lets queued notices go out for at most ``timeout`` seconds, then stops waiting (the thread is a daemon:
        an unreachable webhook never holds the process)."""
        deadline = time.monotonic() + timeout
        with suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._closing.set()
        if self._thread.is_alive():
            log.warning("notify: %d notice(s) not delivered before exit", self._queue.qsize())

    def _run(self) -> None:
        while (notice := self._queue.get()) is not None:
            if self._deliver(notice):
                self.delivered += 1
            else:
                self.failed += 1

    def _deliver(self, notice: Notice) -> bool:
        body = json.dumps(slack_body(notice, self.settings.console_url)).encode("utf-8")
        why = ""
        for attempt in range(1, self.settings.attempts + 1):
            why = self._post_once(body)
            if not why:
                return True
            # Backoff doubles; a closing process stops waiting (close() bounds the whole flush anyway).
            if attempt < self.settings.attempts and self._closing.wait(self.settings.backoff * 2 ** (attempt - 1)):
                break
        log.warning(
            "notify: delivery of the %s notice for %s failed after %d attempt(s) (%s)",
            notice.kind,
            notice.env,
            attempt,
            why,
        )
        return False

    def _post_once(self, body: bytes) -> str:
        """One POST; empty on a 2xx answer, else why it failed (never the URL)."""
        request = urllib.request.Request(
            self._url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as answer:
                return "" if 200 <= answer.status < 300 else f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            return _scrubbed(f"{type(exc).__name__}: {reason}", self._url)


def _scrubbed(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


_active: list[Notifier] = []


def send(notice: Notice) -> None:
    """Hands ``notice`` to the running command's notifier; nothing happens when notifications are off."""
    if _active:
        _active[-1].post(notice)


@contextmanager
def notifying(settings: NotifySettings | None, environ: Mapping[str, str] | None = None) -> Iterator[Notifier | None]:
    """Notifications on for the block's duration when ``[notify]`` is configured and its variable is set (a warning
    line when it is not: notifications are then off, the command runs on); flushed, bounded, at the end."""
    if settings is None:
        yield None
        return
    url = settings.webhook_url(environ)
    if url is None or not url.startswith(("http://", "https://")):
        what = "is not set" if url is None else "does not hold an http(s) URL"
        log.warning("notify: %s %s: notifications are off", settings.webhook_url_env, what)
        yield None
        return
    notifier = Notifier(url, settings)
    _active.append(notifier)
    try:
        yield notifier
    finally:
        _active.remove(notifier)
        notifier.close()
