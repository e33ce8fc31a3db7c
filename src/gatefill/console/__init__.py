"""The operator console (``gatefill ui``): a server-rendered web dashboard of the runs, plans, soaks, pipelines and
gates of the configured environments, with live progress by server-sent events and the CLI's own writes (approve,
pause) behind a bearer token or a signed session cookie."""

from __future__ import annotations

from gatefill.console.app import ConsoleConfig, create_app
from gatefill.console.server import serve_console

__all__ = ["ConsoleConfig", "create_app", "serve_console"]
