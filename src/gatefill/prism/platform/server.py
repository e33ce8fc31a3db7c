"""The PRISM edge functions over HTTP: a FastAPI app with the Supabase paths and contracts, and ``serve`` to run it.

Paths are those Supabase serves (``POST /functions/v1/<name>``) plus the results link ``GET /results/{id}?t=TOKEN``;
bodies are JSON and CORS is ``*`` with upstream's allowed headers. Every function runs through
``gatefill.prism.platform.service`` (one code path with the rest of gatefill); this module only parses,
authenticates, limits and renders. Every error body is ``{error, code}``. ``GET /metrics`` serves the server's
Prometheus metrics (``gatefill.prism.platform.metrics``: every call counted, one total across workers), and a 5xx
answer no event records gets a ``server_error`` event, written after the answer when the database still takes it.

For speed (finalizeAssessment at 20 clients on two cores), the function calls bypass FastAPI's routing layers
(``_FunctionCalls``, same contract), a few at once per process in arrival order (``_CALLS_AT_ONCE``), the Postgres
scoring calls waiting for the database on the event loop rather than on threads, and with ``--workers`` N the
supervisor accepts every connection and hands it to the worker holding the fewest (``_supervise``).

Security decisions, each because a deployment must not be trickable:
- ``score_fc_session`` and ``score_prism`` need ``Authorization: Bearer <service-role key>``, compared in constant
  time; the key is read from the variable named in the config and never appears in a response, a log line or an
  error message.
- Fault injection (``X-Gatefill-Fault``) and simulated time (``X-Gatefill-Now``) are honoured only when the app was
  built with ``allow_fault_injection=True`` *and* the request carries the service-role key; otherwise such a request is
  refused (403 or 401), never silently served as asked.
- The results endpoints are rate limited per client address (sliding window on the injected clock). Uvicorn's own
  access log is off because it prints query strings, which carry share tokens; ``serve`` logs path and status only.
- Uvicorn trusts ``X-Forwarded-For`` from 127.0.0.1 only (its default), so a local proxy, or the traffic simulator
  playing many respondents, can name the client address; remote clients cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import multiprocessing
import multiprocessing.connection
import re
import selectors
import shutil
import signal
import socket
import tempfile
import threading
import time
import types
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from multiprocessing.managers import BaseManager
from typing import Any, NoReturn, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gatefill.clock import Clock, RealClock
from gatefill.config import Environment
from gatefill.db import Database, dumps_json, parse_utc
from gatefill.errors import ConfigError, DatabaseError, DatabaseUnreachable, GatefillError, UsageError
from gatefill.prism.platform.metrics import CONTENT_TYPE, FunctionMetrics, multiprocess_environment
from gatefill.prism.platform.service import (
    CallContext,
    Faults,
    FunctionFailure,
    PrismService,
)
from gatefill.prism.schema import require_schema

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "FUNCTION_NAMES",
    "MAX_BODY_BYTES",
    "RateLimiter",
    "create_app",
    "serve",
    "serve_functions",
    "serve_in_thread",
]

MAX_BODY_BYTES = 64 * 1024
FUNCTION_NAMES = ("score_fc_session", "score_prism", "finalizeAssessment", "get-results-by-session")
_PROTECTED = frozenset({"score_fc_session", "score_prism"})
_RATE_LIMITED = frozenset({"get-results-by-session"})
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_VERSION_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
# Upstream's corsHeaders (supabase/functions/_shared/cors.ts).
_CORS_HEADERS = ["authorization", "x-client-info", "apikey", "content-type"]
_FAULT_HEADER = "x-gatefill-fault"
_NOW_HEADER = "x-gatefill-now"
_REQUEST_ID_HEADER = "x-request-id"
# What a caller may choose as its request id: short, printable, no separators that could forge a log line.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{8,128}")

_log = logging.getLogger("gatefill.functions")
#: Function calls one process runs at once; the others wait their turn in arrival order (``_App.slots``). On Postgres
#: finalizeAssessment and score_prism run on the event loop itself: their two round trips wait there, and their
#: Python (scoring, mostly) holds the loop, so a few at once keep the CPU busy while others wait for Postgres. The
#: other functions, and every function on SQLite, run on as many threads of a plain executor. Threads were the
#: first design for all of them: with Starlette's threadpool (anyio, 40 threads) twenty clients' calls shared the
#: interpreter by 5 ms slices and p95 was 2.2 times p50; four FIFO threads brought that to ~1.6, and the event loop,
#: with no GIL hand-offs between threads, to ~1.3-1.4 (bench/bench_finalize.py, 20 clients).
_CALLS_AT_ONCE = 4

#: Seconds a function call may take, its wait for a slot included, before the caller gets 504 ``CALL_TIMEOUT``
#: (``gatefill serve functions --call-timeout``). Below the 30 s the simulator and the functions executor wait for an
#: answer, so they see the server's verdict rather than a transport timeout of their own.
DEFAULT_CALL_TIMEOUT = 25.0
#: How much longer than the call's deadline a Postgres statement of the server may run: the call answers first, and
#: the statement still ends on the server when no cancellation reaches it (a thread waiting for its answer).
_STATEMENT_GRACE = 1.0


class _JSONResponse(Response):
    """A JSON response printed as JavaScript prints it (``90`` not ``90.0``), so bodies match the original's bytes."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps_json(content).encode("utf-8")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> _JSONResponse:
    return _JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


#: 5xx codes whose failure the service records itself (fc_upsert_error, profile_write_failed, call_timeout events).
_RECORDED_FAILURES = frozenset({"FC_UPSERT_ERROR", "PROFILE_WRITE_FAILED", "CALL_TIMEOUT"})
#: Function failures that are a database write refused.
_WRITE_FAILURES = frozenset({"FC_UPSERT_ERROR", "PROFILE_WRITE_FAILED"})
#: Answers that carry a share token or a profile: never kept by a cache, as the platform answered them.
_NOT_CACHED = frozenset({"finalizeAssessment", "get-results-by-session"})
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class _Attempt:
    """What one call got to before it answered (for its metrics and its error event); local to ``_App.call``."""

    ctx: CallContext | None = None
    session_id: str | None = None
    code: str | None = None
    database_error: bool = False

    def failed(
        self, status: int, code: str, message: str, name: str, headers: dict[str, str] | None = None
    ) -> _JSONResponse:
        self.code = code
        if name in _NOT_CACHED:
            headers = {**(headers or {}), **_NO_STORE}
        return _error(status, code, message, headers)


class _Reject(FunctionFailure):
    """A request refused before it reaches the service (bad input, no key, rate limit), with optional headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, code, message)
        self.headers = headers


class _Limiter(Protocol):
    def check(self, client: str) -> float | None: ...


class RateLimiter:
    """A sliding-window request counter per client address on the injected clock (``limit`` requests per ``window``)."""

    def __init__(self, clock: Clock, limit: int = 60, window: float = 60.0, max_clients: int = 100_000) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, client: str) -> float | None:
        """Records one request; returns None if allowed, else the seconds until the window has room again."""
        now = self.clock.monotonic()
        with self._lock:
            hits = self._hits.get(client)
            if hits is None:
                hits = deque()
                self._hits[client] = hits
                # Bounded memory: forget the least recently seen clients first.
                while len(self._hits) > self.max_clients:
                    self._hits.popitem(last=False)
            else:
                self._hits.move_to_end(client)
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return max(0.0, hits[0] + self.window - now)
            hits.append(now)
            return None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _key_matches(presented: str | None, key: str) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), key.encode("utf-8"))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _Reject(400, "INVALID_REQUEST", "malformed Content-Length")
        if int(declared) > limit:
            raise _Reject(413, "BODY_TOO_LARGE", f"request body over {limit // 1024} KiB")
    chunks: list[bytes] = []
    total = 0
    # A chunked body has no Content-Length: count while reading so nothing over the limit is ever buffered.
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _Reject(413, "BODY_TOO_LARGE", f"request body over {limit // 1024} KiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    # JSON.parse refuses NaN and Infinity; so do we.
    raise ValueError(f"invalid JSON constant {name}")


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise _Reject(400, "INVALID_JSON", "request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise _Reject(400, "INVALID_JSON", "request body must be a JSON object")
    return value


def _session_id(value: object) -> str:
    if value is None or value == "":
        raise _Reject(400, "SESSION_ID_REQUIRED", "session_id is required")
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise _Reject(400, "INVALID_SESSION_ID", "session_id must be a UUID")
    return value.lower()


def _optional_text(body: dict[str, Any], key: str, default: str) -> str:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not _VERSION_RE.fullmatch(value):
        raise _Reject(400, "INVALID_PARAMETER", f"{key} must be a short identifier")
    return value


class _App:
    """The request handling shared by every route: limits, authentication, faults, simulated time, dispatch."""

    def __init__(
        self,
        env: Environment,
        service: PrismService,
        *,
        clock: Clock,
        service_role_key: str,
        allow_fault_injection: bool,
        rate_limit_per_minute: int,
        max_body_bytes: int,
        call_timeout: float,
        metrics: FunctionMetrics,
        limiter: _Limiter | None = None,
    ) -> None:
        self.env = env
        self.metrics = metrics
        self.service = service
        self.clock = clock
        self._key = service_role_key
        self.allow_fault_injection = allow_fault_injection
        # Several worker processes share one limiter (``limiter``, a proxy to it), so a client's limit is the server's.
        self.limiter: _Limiter = limiter or RateLimiter(clock, limit=rate_limit_per_minute, window=60.0)
        self.max_body_bytes = max_body_bytes
        self.call_timeout = call_timeout
        self.calls = ThreadPoolExecutor(max_workers=_CALLS_AT_ONCE, thread_name_prefix="gatefill-call")
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def release(self) -> None:
        """Stops the call threads and returns the service's connections (both come back if the app serves again)."""
        self.calls.shutdown(wait=True)
        self.calls = ThreadPoolExecutor(max_workers=_CALLS_AT_ONCE, thread_name_prefix="gatefill-call")
        self.service.close()

    def client(self, request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def check_rate(self, request: Request) -> None:
        wait = self.limiter.check(self.client(request))
        if wait is not None:
            raise _Reject(
                429, "RATE_LIMITED", "too many requests; try again later", headers={"Retry-After": str(int(wait) + 1)}
            )

    def authorised(self, request: Request) -> bool:
        return _key_matches(_bearer(request), self._key)

    def context(self, request: Request) -> CallContext:
        """The request's "now" and faults; the special headers need fault injection enabled and the service key."""
        fault_header = request.headers.get(_FAULT_HEADER)
        now_header = request.headers.get(_NOW_HEADER)
        faults = Faults()
        now = self.clock.now()
        if fault_header is not None or now_header is not None:
            if not self.allow_fault_injection:
                raise _Reject(403, "FAULT_INJECTION_DISABLED", "fault injection is not enabled on this server")
            if not self.authorised(request):
                raise _Reject(401, "UNAUTHORIZED", "fault injection needs the service-role key")
            if fault_header is not None:
                try:
                    faults = Faults.parse(fault_header)
                except ValueError as exc:
                    raise _Reject(400, "INVALID_FAULT", str(exc)) from None
            if now_header is not None:
                try:
                    now = parse_utc(now_header.strip())
                except ValueError:
                    raise _Reject(400, "INVALID_NOW", "X-Gatefill-Now must be an ISO-8601 instant") from None
        return CallContext(
            now=now,
            faults=faults,
            request_id=self.request_id(request),
            ip=self.client(request),
            ua=request.headers.get("user-agent"),
        )

    def request_id(self, request: Request) -> str:
        """The caller's ``X-Request-Id`` if a service-role caller sent a well-formed one, else a fresh id.

        The functions executor finds its calls' fn_logs rows by this id (to record them for rollback), so only a
        holder of the service-role key may choose it: an anonymous caller could otherwise stamp its own events, and
        with them its rows, with someone else's id.
        """
        presented = request.headers.get(_REQUEST_ID_HEADER, "").strip()
        if presented and _REQUEST_ID_RE.fullmatch(presented) and self.authorised(request):
            return presented
        return uuid.uuid4().hex

    async def slow(self, ctx: CallContext) -> None:
        if ctx.faults.slow_ms > 0:
            # The server's own clock: a real server really waits, a simulated one only moves forward.
            await run_in_threadpool(self.clock.sleep, ctx.faults.slow_ms / 1000.0)

    async def call(self, name: str, request: Request, body_reader: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
        """Runs one function (``answer``), counts it in the metrics and, for a 5xx no event records, has its
        ``server_error`` event written on a call thread after the answer."""
        started = time.perf_counter()
        attempt = _Attempt()
        response = await self.answer(name, request, body_reader, attempt)
        status = response.status_code
        at = attempt.ctx.now if attempt.ctx is not None else self.instant(request)
        self.metrics.observe(name, status, time.perf_counter() - started, at, database_error=attempt.database_error)
        if status >= 500 and attempt.code not in _RECORDED_FAILURES:
            ctx = attempt.ctx or CallContext(now=at, request_id=self.request_id(request), ip=self.client(request))
            if attempt.code == "DATABASE_UNAVAILABLE":
                # Nothing can be written to a database that cannot be reached; trying would only queue connects.
                self.metrics.unrecorded(name)
            else:
                record = partial(self.record_server_error, name, attempt.session_id, ctx, status, attempt.code)
                asyncio.get_running_loop().run_in_executor(self.calls, record)
        return response

    async def answer(
        self,
        name: str,
        request: Request,
        body_reader: Callable[[], Awaitable[dict[str, Any]]],
        attempt: _Attempt,
    ) -> Response:
        """Rate limit, auth, body, validation, service call; errors become ``{error, code}`` (noted in ``attempt``)."""
        try:
            if name in _RATE_LIMITED:
                self.check_rate(request)
            if name in _PROTECTED and not self.authorised(request):
                raise _Reject(401, "UNAUTHORIZED", "missing or invalid service-role key")
            ctx = attempt.ctx = self.context(request)
            payload = await body_reader()
            session_id = attempt.session_id = _session_id(payload.get("session_id"))
            if "server_error" in ctx.faults:
                raise GatefillError("injected fault server_error")
            run = self.prepare(name, session_id, payload, ctx, request)
            await self.slow(ctx)
            status, body = await self.bounded(name, run, ctx, session_id)
            return _JSONResponse(body, status_code=status, headers=_NO_STORE if name in _NOT_CACHED else None)
        except _Reject as exc:
            return attempt.failed(exc.status, exc.code, exc.message, name, exc.headers)
        except FunctionFailure as exc:
            attempt.database_error = exc.code in _WRITE_FAILURES
            return attempt.failed(exc.status, exc.code, exc.message, name)
        except DatabaseUnreachable:
            _log.error("%s: database unreachable", name)
            attempt.database_error = True
            return attempt.failed(503, "DATABASE_UNAVAILABLE", "database unavailable", name)
        except DatabaseError as exc:
            _log.error("%s: %s", name, exc)
            attempt.database_error = True
            return attempt.failed(500, "DATABASE_ERROR", "database error", name)
        except GatefillError as exc:
            _log.error("%s: %s", name, exc)
            return attempt.failed(500, "INTERNAL_ERROR", "internal error", name)
        except Exception as exc:
            # Never echo the exception: it could carry row data; the log has its type and the traceback.
            _log.exception("%s: unhandled %s", name, type(exc).__name__)
            return attempt.failed(500, "INTERNAL_ERROR", "internal error", name)

    def instant(self, request: Request) -> datetime:
        """A call's instant when it was refused before its context was built: the ``X-Gatefill-Now`` instant a
        fault-injection server would have accepted, else the server's clock (only the metrics use it)."""
        header = request.headers.get(_NOW_HEADER)
        if header is not None and self.allow_fault_injection and self.authorised(request):
            with contextlib.suppress(ValueError):
                return parse_utc(header.strip())
        return self.clock.now()

    def record_server_error(
        self, name: str, session_id: str | None, ctx: CallContext, status: int, code: str | None
    ) -> None:
        """Writes the ``server_error`` event of a 5xx answer; when the database refuses it (it may be why the call
        failed) the answer stands, the log says so and the metrics count it as unrecorded."""
        try:
            self.service.record_server_error(name, session_id, ctx, status, code or "")
        except GatefillError as exc:
            self.metrics.unrecorded(name)
            _log.warning("%s: the server_error event was not written: %s", name, exc)
        except Exception:
            self.metrics.unrecorded(name)
            _log.exception("%s: the server_error event was not written", name)

    async def bounded(
        self,
        name: str,
        run: Callable[[], Awaitable[tuple[int, dict[str, object]]]],
        ctx: CallContext,
        session_id: str,
    ) -> tuple[int, dict[str, object]]:
        """``run`` in its turn (``slots``), answered 504 ``CALL_TIMEOUT`` when waiting and running outlast the deadline.

        On the event loop the expiry cancels the call where it waits: its connection, a batch half answered, is
        closed rather than parked, and nothing it sent is committed unless its COMMIT already went out. A call on a
        thread cannot be stopped; it finishes (or its statement hits the server's statement_timeout) unseen. Either
        way a ``call_timeout`` event is written afterwards, on a call thread, without holding up the answer.
        """
        deadline = asyncio.timeout(self.call_timeout)
        try:
            async with deadline, self.slots():
                return await run()
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout of the call's own, not the deadline
            _log.warning("%s: no answer within %g s; answered 504", name, self.call_timeout)
            record = partial(self.record_timeout, name, session_id, ctx)
            asyncio.get_running_loop().run_in_executor(self.calls, record)
            raise _Reject(504, "CALL_TIMEOUT", f"the call did not finish within {self.call_timeout:g} s") from None

    def record_timeout(self, name: str, session_id: str, ctx: CallContext) -> None:
        """Writes the ``call_timeout`` event; a failure (the database may be what is stuck) is only logged and counted
        in the metrics as unrecorded."""
        try:
            self.service.record_timeout(name, session_id, ctx, self.call_timeout)
        except GatefillError as exc:
            self.metrics.unrecorded(name)
            _log.warning("%s: the call_timeout event was not written: %s", name, exc)
        except Exception:
            self.metrics.unrecorded(name)
            _log.exception("%s: the call_timeout event was not written", name)

    def slots(self) -> asyncio.Semaphore:
        """The event loop's limit on calls running at once (``_CALLS_AT_ONCE``); waiters go in arrival order."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(_CALLS_AT_ONCE))
        return self._slots[1]

    def prepare(
        self, name: str, session_id: str, body: dict[str, Any], ctx: CallContext, request: Request
    ) -> Callable[[], Awaitable[tuple[int, dict[str, object]]]]:
        """Validates the rest of the body (``session_id`` is, already) on the event loop, so no SQL sees
        unvalidated input, and returns the database work.

        finalizeAssessment and score_prism wait for Postgres on the event loop (``PrismService.*_async``); the
        other functions, and every function on SQLite, run on the call threads.
        """
        service = self.service
        calls = self.calls
        if name == "score_fc_session":
            version = _optional_text(body, "version", "v1.2")
            basis = _optional_text(body, "basis", "functions")
            if basis not in ("functions", "types"):
                raise _Reject(400, "INVALID_PARAMETER", "basis must be 'functions' or 'types'")
            return self.threaded(lambda: (200, service.score_fc_session(session_id, ctx, version=version, basis=basis)))
        if name == "score_prism":

            async def score() -> tuple[int, dict[str, object]]:
                return 200, await service.score_prism_async(session_id, ctx, calls)

            return score
        if name == "finalizeAssessment":
            responses = body.get("responses")
            count = len(responses) if isinstance(responses, list) else None
            base = self.env.results_url or str(request.base_url)

            async def finalize() -> tuple[int, dict[str, object]]:
                reply = await service.finalize_async(
                    session_id, ctx, calls, responses_count=count, results_base_url=base
                )
                return 200, reply

            return finalize
        token = body.get("share_token")
        presented = token if isinstance(token, str) else None

        def results() -> tuple[int, dict[str, object]]:
            outcome = service.get_results(session_id, presented, ctx)
            return outcome.status, outcome.body

        return self.threaded(results)

    def threaded(
        self, work: Callable[[], tuple[int, dict[str, object]]]
    ) -> Callable[[], Awaitable[tuple[int, dict[str, object]]]]:
        """``work`` as a call to run on one of the call threads."""
        calls = self.calls
        return lambda: asyncio.get_running_loop().run_in_executor(calls, work)


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    return _parse_json_object(await _read_body(request, limit))


_FUNCTIONS_PREFIX = "/functions/v1/"


class _FunctionCalls:
    """``POST /functions/v1/<name>`` for the four functions, straight to ``_App.call``.

    FastAPI's path to the same call (routing, its exception and exit-stack middleware, the endpoint's dependency
    solving, CORS's own wrapper) cost more CPU than the HTTP parsing and the response together, on every call.
    This middleware sits outside all of that and answers exactly what the route would: the same handler, the same
    response, and the CORS headers of the app's own ``CORSMiddleware`` configuration (its ``send``), so bodies,
    statuses and headers are unchanged. Everything else (other paths and methods, preflights, unknown names, a
    mounted root path) goes on to FastAPI. An unexpected exception in a call is answered 500 ``INTERNAL_ERROR`` by
    ``_App.answer`` itself (so the metrics and the ``server_error`` event see it), as FastAPI's handler answers it
    elsewhere.
    """

    def __init__(self, app: Any, *, handler: _App, cors: CORSMiddleware) -> None:
        self.app = app
        self.handler = handler
        self.cors = cors

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path: str = scope["path"]
            name = path[len(_FUNCTIONS_PREFIX) :] if path.startswith(_FUNCTIONS_PREFIX) else None
            if name in FUNCTION_NAMES:
                assert name is not None
                request = Request(scope, receive)
                body = partial(_json_body, request, self.handler.max_body_bytes)
                response = await self.handler.call(name, request, body)
                await response(scope, receive, partial(self.cors.send, send=send, request_headers=request.headers))
                return
        await self.app(scope, receive, send)


def create_app(
    env: Environment,
    db: Database,
    *,
    clock: Clock | None = None,
    allow_fault_injection: bool = False,
    rate_limit_per_minute: int = 60,
    service_role_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    reference_ttl: float = 10.0,
    limiter: _Limiter | None = None,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
    metrics: FunctionMetrics | None = None,
) -> FastAPI:
    """The functions app for ``env`` on ``db``; raises ``ConfigError`` if the service-role key variable is unset.

    ``limiter`` replaces the app's own results rate limiter (worker processes share one this way), ``metrics`` the
    app's own in-process metrics (worker processes write shared ones, see ``FunctionMetrics``). A call that has
    not answered ``call_timeout`` seconds after its turn was asked for (its body read, any injected slowness over)
    answers 504 ``CALL_TIMEOUT``; give ``db`` a slightly longer ``statement_timeout`` (``server_database``) so its
    statements end too.
    """
    if not call_timeout > 0:
        raise UsageError("the call timeout must be a positive number of seconds")
    key = service_role_key or env.service_role_key()
    if not key:
        raise ConfigError(
            f"environment '{env.name}': variable {env.service_role_key_env} (service_role_key_env) is not set"
        )
    clock = clock or RealClock()
    service = PrismService(db, clock=clock, reference_ttl=reference_ttl)
    handler = _App(
        env,
        service,
        clock=clock,
        service_role_key=key,
        allow_fault_injection=allow_fault_injection,
        rate_limit_per_minute=rate_limit_per_minute,
        max_body_bytes=max_body_bytes,
        call_timeout=call_timeout,
        metrics=metrics or FunctionMetrics(),
        limiter=limiter,
    )
    app = FastAPI(title="gatefill PRISM functions", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gatefill = handler
    cors: dict[str, Any] = {
        "allow_origins": ["*"],
        "allow_methods": ["POST", "GET", "OPTIONS"],
        "allow_headers": _CORS_HEADERS,
    }
    app.add_middleware(CORSMiddleware, **cors)
    # Outside CORS, so the function calls skip the stack below it; it adds CORS's headers itself.
    app.add_middleware(_FunctionCalls, handler=handler, cors=CORSMiddleware(app.router, **cors))
    _add_error_handlers(app)
    _add_routes(app, handler)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Answers HTTP errors and unexpected exceptions in the functions' JSON error shape."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "request refused")
        return _error(exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        # Never echo the exception: it could carry row data; the log has its type and the traceback.
        _log.exception("unhandled %s", type(exc).__name__)
        return _error(500, "INTERNAL_ERROR", "internal error")


def _add_routes(app: FastAPI, handler: _App) -> None:
    """The app's routes: the functions (those ``_FunctionCalls`` passes on), the metrics and the results link."""

    @app.post("/functions/v1/{name}")
    async def _function(name: str, request: Request) -> Response:
        # _FunctionCalls answers the known names; this route answers the rest (and any request it passes on).
        if name not in FUNCTION_NAMES:
            return _error(404, "FUNCTION_NOT_FOUND", "function not found")
        return await handler.call(name, request, partial(_json_body, request, handler.max_body_bytes))

    @app.get("/metrics")
    async def _metrics() -> Response:
        # Names, statuses and timings only: nothing in it identifies a respondent, so it is served without a key.
        body = await run_in_threadpool(handler.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/results/{session_id}")
    async def _results_link(session_id: str, request: Request) -> Response:
        token = request.query_params.get("t")

        async def body() -> dict[str, Any]:
            return {"session_id": session_id, "share_token": token}

        return await handler.call("get-results-by-session", request, body)


class _ThreadServer(uvicorn.Server):
    """Uvicorn without its signal handlers, so it can run outside the main thread."""

    def install_signal_handlers(self) -> None:
        return None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is a one-line ``UsageError``, not uvicorn's exit."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _AccessLog:
    """Logs method, path (never the query: it carries share tokens), status and duration of each request.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` runs every response through a task group and a
    memory stream, which cost more CPU than a finalize's own HTTP handling.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if _log.isEnabledFor(logging.INFO):
                _log.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    scope["path"],
                    status,
                    (time.perf_counter() - started) * 1000,
                )


def _uvicorn_config(app: FastAPI, log_level: str) -> uvicorn.Config:
    # Uvicorn's access log prints query strings (share tokens): off. Proxy headers stay trusted from 127.0.0.1 only.
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=5)


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 54321, log_level: str = "info") -> None:
    """Runs ``app`` under uvicorn until interrupted; access lines carry method, path and status, never queries."""
    sock = _bind(host, port)
    try:
        _serve_on(app, sock, log_level)
    finally:
        sock.close()
        _release(app)


def _release(app: FastAPI) -> None:
    """Gives the database connections the app's service keeps back to the pool, once it serves no more."""
    handler = getattr(app.state, "gatefill", None)
    if isinstance(handler, _App):
        handler.release()


def _serve_on(app: FastAPI, sock: socket.socket, log_level: str) -> None:
    _prepare(app, log_level)
    uvicorn.Server(_uvicorn_config(app, log_level)).run(sockets=[sock])


def _prepare(app: FastAPI, log_level: str) -> None:
    """The log handler and the access log of a served app, and the garbage collector of the process serving it."""
    # Everything built so far (modules, the app, SQLAlchemy's caches) lives as long as the process: freeze it out of
    # the collector's scans, and collect the young generation less often. A call allocates thousands of containers,
    # so with the default threshold of 700 a full collection walked the whole heap every few hundred calls, a pause
    # the calls queued behind it all saw in their latency.
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, 20, 20)
    if not _log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(log_level.upper())
    app.add_middleware(_AccessLog)


@contextmanager
def serve_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Serves ``app`` from a background thread (port 0: a free one); yields the base URL, stops on exit."""
    sock = _bind(host, port)
    server = _ThreadServer(_uvicorn_config(app, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gatefill-functions", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise GatefillError(f"the functions server on {host}:{sock.getsockname()[1]} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        _release(app)


def serve_functions(
    env: Environment,
    *,
    host: str = "127.0.0.1",
    port: int = 54321,
    allow_fault_injection: bool = False,
    log_level: str = "info",
    on_ready: Callable[[str], None] | None = None,
    workers: int = 1,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
) -> None:
    """What ``gatefill serve functions`` runs: opens the database, builds the app and serves until interrupted.

    Fault injection is refused for production environments: there it would let a key holder corrupt live rows.
    ``workers`` > 1 serves from that many processes on one listening socket (one interpreter per core: the scoring
    is CPU-bound Python), sharing one results rate limiter held by a manager process, so the per-client limit stays
    the server's limit; this process only supervises them and stops them all when one exits or it is stopped.
    """
    if allow_fault_injection and env.kind == "production":
        raise UsageError(f"environment '{env.name}' is production: --allow-fault-injection is refused there")
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if not call_timeout > 0:
        raise UsageError("--call-timeout must be a positive number of seconds")
    with server_database(env, call_timeout) as db:
        require_schema(db)
        if workers == 1:
            app = create_app(env, db, allow_fault_injection=allow_fault_injection, call_timeout=call_timeout)
            if on_ready is not None:
                on_ready(f"http://{host}:{port}/functions/v1")
            serve(app, host=host, port=port, log_level=log_level)
            return
        # Fail here, once, rather than in every worker.
        create_app(env, db, allow_fault_injection=allow_fault_injection, call_timeout=call_timeout)
    _supervise(env, host, port, allow_fault_injection, log_level, on_ready, workers, call_timeout)


def server_database(env: Environment, call_timeout: float = DEFAULT_CALL_TIMEOUT) -> Database:
    """The database of a serving process: its pool, and on Postgres a statement_timeout a little past the call's."""
    return Database(env, pool_size=_POOL_SIZE, statement_timeout=call_timeout + _STATEMENT_GRACE)


#: Allocations (net) between young-generation collections in a serving process (Python's default: 700).
_GC_THRESHOLD = 20_000

#: Pending connections the supervisor's listening socket queues (uvicorn's default).
_BACKLOG = 2048

#: Connections per server process: the parked ones of the calls running at once (``_CALLS_AT_ONCE``), the reference
#: reloads and failure records beside them, and room to spare.
_POOL_SIZE = 20


@dataclass(frozen=True)
class _WorkerMetrics:
    """Where the workers of one supervisor write their metrics, and when it started (the server's start time)."""

    directory: str
    started: float


class _LimiterManager(BaseManager):
    """Holds the one RateLimiter every worker process asks (through a proxy) in a process of its own."""


_LimiterManager.register("RateLimiter", RateLimiter)


def _supervise(
    env: Environment,
    host: str,
    port: int,
    allow_fault_injection: bool,
    log_level: str,
    on_ready: Callable[[str], None] | None,
    workers: int,
    call_timeout: float,
) -> None:
    """Starts the workers, then accepts every connection and hands it to the worker holding the fewest.

    Worker processes accepting from one shared socket split keep-alive clients by who wakes first: 20 clients
    opened at once landed 16/4 or even 20/0 on two workers, so one process queued most requests while the other
    idled (p95 more than doubled). Here the supervisor, otherwise idle, accepts and passes each connection's file
    descriptor to the worker with the fewest open connections (``handed`` minus ``closed``, each counter written by
    one process only); the worker serves it as if it had accepted it. The hop costs one sendmsg per connection, not
    per request.
    """
    spawn = multiprocessing.get_context("spawn")
    sock = _bind(host, port)
    manager = _LimiterManager(ctx=spawn)
    processes: list[multiprocessing.process.BaseProcess] = []
    channels: list[socket.socket] = []
    # Connections handed to each worker (written here) and closed by it (written by that worker).
    handed = [0] * workers
    closed = spawn.Array("q", workers, lock=False)
    previous = None
    # Every worker writes its metrics into files here, and a scrape of any worker merges them all (one total).
    metrics_dir = tempfile.mkdtemp(prefix="gatefill-metrics-")
    started = time.time()

    def _stop(_signum: int, _frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _stop)
        manager.start()
        limiter = manager.RateLimiter(RealClock(), 60, 60.0)  # type: ignore[attr-defined]
        metrics = _WorkerMetrics(metrics_dir, started)
        for index in range(workers):
            channel, worker = _start_worker(
                spawn, env, allow_fault_injection, log_level, limiter, closed, index, call_timeout, metrics
            )
            channels.append(channel)
            processes.append(worker)
        if on_ready is not None:
            on_ready(f"http://{host}:{port}/functions/v1")
        _dispatch(sock, processes, channels, handed, closed)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_workers(channels, processes)
        manager.shutdown()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _start_worker(
    spawn: multiprocessing.context.SpawnContext,
    env: Environment,
    allow_fault_injection: bool,
    log_level: str,
    limiter: _Limiter,
    closed: Any,
    index: int,
    call_timeout: float,
    metrics: _WorkerMetrics,
) -> tuple[socket.socket, multiprocessing.process.BaseProcess]:
    """Starts worker ``index`` with its end of a new channel; returns our end and the process."""
    # SEQPACKET: one message per connection, with its descriptor, and end-of-file when this process exits.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = spawn.Process(
        target=_serve_worker,
        args=(env, theirs, allow_fault_injection, log_level, limiter, closed, index, call_timeout, metrics),
        name="gatefill-functions-worker",
    )
    with multiprocess_environment(metrics.directory):
        worker.start()
    theirs.close()
    return ours, worker


def _dispatch(
    sock: socket.socket,
    processes: Sequence[multiprocessing.process.BaseProcess],
    channels: list[socket.socket],
    handed: list[int],
    closed: Any,
) -> NoReturn:
    """Listens, and hands every connection to a worker until one of the workers exits (a ``GatefillError``)."""
    sock.listen(_BACKLOG)
    sock.setblocking(False)
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ, None)
        for process in processes:
            selector.register(process.sentinel, selectors.EVENT_READ, process)
        while True:
            for key, _ in selector.select():
                if key.data is not None:
                    code = key.data.exitcode
                    raise GatefillError(f"functions worker process exited (code {code}); server stopped")
                _hand_over(sock, channels, handed, closed)


def _stop_workers(channels: Sequence[socket.socket], processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Closes the channels and stops the worker processes: terminated, then killed if they do not exit in time."""
    for channel in channels:
        channel.close()
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()


def _hand_over(sock: socket.socket, channels: list[socket.socket], handed: list[int], closed: Any) -> None:
    """Accepts every pending connection and sends each to the worker with the fewest open ones."""
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionAbortedError:
            continue  # the client gave up before we accepted
        except OSError as exc:
            # Out of descriptors, most likely: wait a little rather than spin on a socket that stays readable.
            _log.warning("accept failed: %s", exc)
            time.sleep(0.1)
            return
        with conn:
            index = min(range(len(channels)), key=lambda i: handed[i] - closed[i])
            socket.send_fds(channels[index], [b"c"], [conn.fileno()])
            handed[index] += 1


def _serve_worker(
    env: Environment,
    channel: socket.socket,
    allow_fault_injection: bool,
    log_level: str,
    limiter: _Limiter,
    closed: Any,
    index: int,
    call_timeout: float,
    metrics: _WorkerMetrics,
) -> None:
    """One worker process: its own database pool and app, serving the connections the supervisor hands it."""
    with server_database(env, call_timeout) as db:
        app = create_app(
            env,
            db,
            allow_fault_injection=allow_fault_injection,
            limiter=limiter,
            call_timeout=call_timeout,
            metrics=FunctionMetrics(multiprocess_dir=metrics.directory, started=metrics.started),
        )
        _serve_handed(app, channel, log_level, closed, index)


def _serve_handed(app: FastAPI, channel: socket.socket, log_level: str, closed: Any, index: int) -> None:
    """Uvicorn without a listening socket of its own: it serves each connection whose descriptor arrives on
    ``channel``, built with the protocol uvicorn would build on accept, and counts closed ones in ``closed[index]``."""
    _prepare(app, log_level)
    config = _uvicorn_config(app, log_level)
    config.load()
    server = uvicorn.Server(config)
    protocol_class: Any = config.http_protocol_class

    class _Counted(protocol_class):  # type: ignore[misc]
        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                closed[index] += 1

    def protocol() -> asyncio.Protocol:
        # What uvicorn's own accept builds (lifespan is off, so the app state is empty).
        built: asyncio.Protocol = _Counted(
            config=config, server_state=server.server_state, app_state={}, _loop=asyncio.get_running_loop()
        )
        return built

    async def receive() -> None:
        loop = asyncio.get_running_loop()
        channel.setblocking(False)
        readable = asyncio.Event()
        loop.add_reader(channel, readable.set)
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(channel, 16, 8)
            except (BlockingIOError, InterruptedError):
                readable.clear()
                await readable.wait()
                continue
            if not message:
                # The supervisor is gone: nobody can reach this worker any more.
                server.should_exit = True
                return
            for fd in fds:
                await loop.connect_accepted_socket(protocol, socket.socket(fileno=fd))

    async def main() -> None:
        receiving = asyncio.create_task(receive())
        try:
            await server.serve(sockets=[])
        finally:
            receiving.cancel()

    try:
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(main())
    finally:
        _release(app)
