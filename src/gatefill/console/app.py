"""The console's FastAPI application: its pages (runs, a run, a plan under review, a soak, the pipeline, gates, the
ongoing watch), the run files and rendered reports, the live event stream, ``/metrics``, and the writes the CLI has
(approve, pause).

Handlers parse, call one reading function of ``console.reads`` (or the CLI's approve), and render; the rules of who may
write live in ``console.auth``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import parse_qs, quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from gatefill import ledger
from gatefill.config import Settings
from gatefill.console import reads
from gatefill.console.actions import pause_run, resume_command
from gatefill.console.auth import LOGIN_COOKIE, SESSION_COOKIE, SESSION_SECONDS, Auth, Viewer
from gatefill.console.metrics import metrics_text
from gatefill.console.render import markdown_html, page
from gatefill.errors import GatefillError
from gatefill.runs import GATES, ApprovalOutcome

__all__ = ["Approver", "ConsoleConfig", "create_app"]

#: Seconds between the live stream's looks at the ledger, and between its keep-alive comments.
LIVE_POLL = 0.5
KEEP_ALIVE = 15.0


class Approver(Protocol):
    """``gatefill.commands.approve``: the console records approvals with the CLI's own function."""

    def __call__(
        self, settings: Settings, run_id: str, *, gate: str, by: str, note: str | None, env_name: str | None
    ) -> ApprovalOutcome: ...


@dataclass(frozen=True)
class ConsoleConfig:
    """What one console serves: the settings, the environments it watches, the operator token (None: read-only)
    and the CLI's approve."""

    settings: Settings
    envs: tuple[str, ...]
    token: str | None
    approve: Approver


class _SignInRequired(Exception):
    """A page of a console with a token was asked for without it."""


class _Refused(Exception):
    """A write refused before it reached the ledger: the status and the one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _SecurityHeaders:
    """Adds the headers every answer carries: only our own scripts, styles and images; no framing; no referrer."""

    HEADERS = (
        (b"content-security-policy", b"default-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'self'"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, sending if scope["type"] == "http" else send)


def _viewer(request: Request) -> Viewer:
    """The operator of a page request; ``_SignInRequired`` when the console has a token and the request lacks it."""
    auth: Auth = request.app.state.auth
    seen = auth.viewer(request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE))
    if seen.auth_required and not seen.signed_in:
        raise _SignInRequired()
    return seen


Who = Annotated[Viewer, Depends(_viewer)]


def create_app(config: ConsoleConfig) -> FastAPI:
    """The console for ``config``; its routes are registered by the ``_routes_*`` functions below."""
    app = FastAPI(title="gatefill console", docs_url=None, redoc_url=None, openapi_url=None)
    auth = Auth(config.token)
    app.state.auth = auth
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    _handlers(app)
    _routes_login(app, auth)
    _routes_pages(app, config)
    _routes_runs(app, config)
    _routes_writes(app, config, auth)
    app.add_middleware(_SecurityHeaders)
    return app


def _html(template: str, viewer: Viewer, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(page(template, viewer=viewer, **context), status_code=status)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(_SignInRequired)
    async def sign_in(request: Request, exc: _SignInRequired) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/login?next=" + quote(request.url.path), status_code=303)
        return PlainTextResponse("sign in: Authorization: Bearer TOKEN", 401, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> Response:
        return PlainTextResponse(exc.reason + "\n", exc.status)

    @app.exception_handler(GatefillError)
    async def gatefill_error(request: Request, exc: GatefillError) -> Response:
        status = 404 if isinstance(exc, ledger.RunNotFound) else 400
        auth: Auth = request.app.state.auth
        seen = auth.viewer(request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE))
        return _html("error.html", seen, status, message=str(exc))


def _routes_login(app: FastAPI, auth: Auth) -> None:
    @app.get("/login", response_class=HTMLResponse)
    def login_form(next: str = "/") -> Response:
        if not auth.required:
            return RedirectResponse("/", status_code=303)
        nonce = auth.new_session().split(".")[0]
        response = _html("login.html", Viewer(None, None, True), csrf=nonce, next=_local(next), wrong=False)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", max_age=600)
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        if not auth.required:
            raise _Refused(403, "read-only console: started without --auth-token-env")
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        if not nonce or nonce != form.get("csrf"):
            raise _Refused(403, "CSRF token missing or invalid: reload the login page")
        if not auth.token_matches(form.get("token")):
            viewer = Viewer(None, None, True)
            return _html("login.html", viewer, 401, csrf=nonce, next=_local(form.get("next")), wrong=True)
        response = RedirectResponse(_local(form.get("next")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE, auth.new_session(), httponly=True, samesite="strict", max_age=SESSION_SECONDS
        )
        response.delete_cookie(LOGIN_COOKIE)
        return response


def _local(target: str | None) -> str:
    """A redirect target on this site only (``/runs``), never another host (``//evil``, ``https://...``)."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body as single values (the console's forms post nothing else)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _routes_pages(app: FastAPI, config: ConsoleConfig) -> None:
    settings, envs = config.settings, config.envs

    @app.get("/", response_class=HTMLResponse)
    def runs_page(who: Who, env: str | None = None, phase: str | None = None, status: str | None = None) -> Response:
        where = reads.RunFilter(env or None, phase or None, status or None)
        rows = reads.run_rows(settings, envs, where)
        statuses = [s.value for s in ledger.RunStatus]
        return _html(
            "runs.html", who, rows=rows, where=where, envs=envs, statuses=statuses, now=reads.now_utc(), title="Runs"
        )

    @app.get("/gates", response_class=HTMLResponse)
    def gates_page(who: Who) -> Response:
        return _html("gates.html", who, records=reads.gates(settings, envs), title="Gates")

    @app.get("/metrics")
    def metrics(who: Who) -> Response:
        return Response(metrics_text(settings, envs), media_type=CONTENT_TYPE_LATEST)

    @app.get("/watch", response_class=HTMLResponse)
    def watch_all_page(who: Who) -> Response:
        return _html("watch.html", who, view=reads.watch_view(settings, envs), env=None, envs=envs, title="Watch")

    @app.get("/env/{env}/watch", response_class=HTMLResponse)
    def watch_page(who: Who, env: str) -> Response:
        view = reads.watch_view(settings, [_known(config, env)])
        return _html("watch.html", who, view=view, env=env, envs=envs, title=f"Watch · {env}")

    @app.get("/pipeline", response_class=HTMLResponse)
    def pipeline_page(who: Who) -> Response:
        latest = reads.run_rows(settings, envs, reads.RunFilter(phase="pipeline"), limit=1)
        if not latest:
            return _html("pipeline.html", who, view=None, notice=None, title="Pipeline")
        view = reads.pipeline_view(settings, envs, latest[0].env, latest[0].run.id)
        return _html("pipeline.html", who, view=view, notice=None, title="Pipeline")


def _known(config: ConsoleConfig, env: str) -> str:
    if env not in config.envs:
        raise _Refused(404, f"environment '{env}' is not watched by this console")
    return env


def _notice(approved: str | None, again: str | None, paused: str | None) -> str | None:
    """The line a page shows after a write redirected to it (fixed wording: nothing from the query is echoed but a
    gate's name, escaped)."""
    if paused:
        return "Ctrl-C (SIGINT) sent to the apply: it pauses after its current batch."
    if approved in GATES:
        return (
            f"The {approved} gate was already approved: nothing recorded."
            if again
            else f"Approved the {approved} gate."
        )
    return None


def _routes_runs(app: FastAPI, config: ConsoleConfig) -> None:
    settings, envs = config.settings, config.envs

    @app.get("/env/{env}/runs/{run_id}", response_class=HTMLResponse)
    def run_page(
        who: Who,
        env: str,
        run_id: str,
        approved: str | None = None,
        again: str | None = None,
        paused: str | None = None,
    ) -> Response:
        _known(config, env)
        notice = _notice(approved, again, paused)
        view = reads.run_view(settings, env, run_id)
        if view.run.phase == "soak":
            soak = reads.soak_view(settings, env, run_id)
            return _html("soak.html", who, view=soak, env=env, notice=notice, title=f"Soak {run_id}")
        if view.run.phase == "pipeline":
            pipeline = reads.pipeline_view(settings, envs, env, run_id)
            return _html("pipeline.html", who, view=pipeline, notice=notice, title=f"Pipeline {run_id}")
        resume = resume_command(env, run_id) if view.run.status is ledger.RunStatus.PAUSED else None
        return _html("run.html", who, view=view, env=env, resume=resume, notice=notice, title=f"Run {run_id}")

    @app.get("/env/{env}/runs/{run_id}/plan", response_class=HTMLResponse)
    def plan_page(env: str, run_id: str, who: Who) -> Response:
        _known(config, env)
        view = reads.run_view(settings, env, run_id)
        plan = reads.plan_of(settings, env, view.progress)
        if plan is None:
            raise _Refused(404, f"run {run_id} has no plan")
        return _html("plan.html", who, view=view, plan=plan, env=env, title=f"Plan {run_id}")

    @app.get("/env/{env}/runs/{run_id}/files/{path:path}")
    def run_file(env: str, run_id: str, path: str, who: Who) -> Response:
        found = reads.artifact_path(settings, run_id, path) if _known(config, env) else None
        if found is None:
            raise _Refused(404, f"run {run_id} has no file {path}")
        if found.suffix == ".md":
            html = markdown_html(found.read_text(encoding="utf-8"))
            return _html("report.html", who, env=env, run_id=run_id, name=path, html=html, title=path)
        media = None if found.suffix == ".png" else "text/plain; charset=utf-8"
        return FileResponse(found, media_type=media)

    @app.get("/env/{env}/runs/{run_id}/events")
    async def run_events(env: str, run_id: str, request: Request, who: Who) -> Response:
        _known(config, env)
        await run_in_threadpool(reads.live_state, settings, env, run_id)  # an unknown run is a 404 here, not a stream
        stream = _live_stream(request, lambda: reads.live_state(settings, env, run_id))
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _live_stream(request: Request, read: Callable[[], reads.LiveState]) -> AsyncIterator[str]:
    """A server-sent event each time the run's live state changes; ``done`` once it is terminal."""
    last, quiet = "", 0.0
    while not await request.is_disconnected():
        state = (await run_in_threadpool(read)).to_json()
        data = json.dumps(state, sort_keys=True)
        if data != last:
            last, quiet = data, 0.0
            yield f"data: {data}\n\n"
        elif quiet >= KEEP_ALIVE:
            quiet = 0.0
            yield ": keep-alive\n\n"
        if state["terminal"]:
            yield "event: done\ndata: {}\n\n"
            return
        await asyncio.sleep(LIVE_POLL)
        quiet += LIVE_POLL


def _routes_writes(app: FastAPI, config: ConsoleConfig, auth: Auth) -> None:
    settings = config.settings

    async def checked(request: Request) -> dict[str, str]:
        """The form of a write, after the rules: a token configured, an operator signed in, a valid CSRF token."""
        form = await _form(request)
        if not auth.required:
            raise _Refused(403, "read-only console: started without --auth-token-env")
        seen = auth.viewer(request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE))
        if seen.identity is None:
            raise _Refused(401, "not signed in: the operator token is required to write")
        if not auth.csrf_matches(seen.identity, form.get("csrf")):
            raise _Refused(403, "CSRF token missing or invalid: reload the page and submit again")
        return form

    @app.post("/env/{env}/runs/{run_id}/approve")
    async def approve(env: str, run_id: str, request: Request) -> Response:
        form = await checked(request)
        _known(config, env)
        by, note = form.get("by", "").strip(), form.get("note", "").strip() or None
        gate = form.get("gate", "")
        outcome = await run_in_threadpool(
            lambda: config.approve(settings, run_id, gate=gate, by=by, note=note, env_name=env)
        )
        again = "" if outcome.recorded else "&again=1"
        return RedirectResponse(f"/env/{env}/runs/{run_id}?approved={quote(gate)}{again}", status_code=303)

    @app.post("/env/{env}/runs/{run_id}/pause")
    async def pause(env: str, run_id: str, request: Request) -> Response:
        await checked(request)
        _known(config, env)
        await run_in_threadpool(pause_run, settings, env, run_id)
        return RedirectResponse(f"/env/{env}/runs/{run_id}?paused=1", status_code=303)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        await checked(request)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response
