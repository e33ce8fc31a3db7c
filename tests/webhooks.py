"""A webhook receiver for the notification tests: a real HTTP server on 127.0.0.1 that keeps what it is sent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: The secret part of the receiver's URL (as a Slack webhook's path is): it must never be logged.
HOOK_SECRET = "T0KEN-of-the-webhook-77aa"


class Receiver:
    """A webhook receiver: answers each POST with the next status of ``statuses`` (then 200), keeps every body."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                owner.attempts += 1
                status = owner.statuses.pop(0) if owner.statuses else 200
                if status == 200:
                    owner.bodies.append(body)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{HOOK_SECRET}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
