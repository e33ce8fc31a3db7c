"""A PgBouncer in transaction mode in front of the test server, started per test process on a free port.

It is configured to be as unkind as Supavisor's transaction mode (port 6543) can be: ``pool_mode = transaction``,
and ``server_round_robin`` with two server connections kept per database, so consecutive transactions of one client
land on different backends. Whatever relies on a session (prepared statements, ``SET``, session advisory locks,
temporary tables) breaks here at once instead of one run in seven.

PgBouncer refuses to run as root; as root it runs as the ``postgres`` user (the Debian package's). The binary comes
from Debian's ``pgbouncer`` package, which ``make test`` installs when it is missing; ``PGBOUNCER`` names another.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["PgBouncer", "pgbouncer_binary", "start_pgbouncer"]


@dataclass
class PgBouncer:
    """A running PgBouncer: where it listens, its files, and its process."""

    host: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    def url(self, server_url: str, database: str) -> str:
        """``server_url`` (libpq form) pointed at database ``database`` through this pooler."""
        parts = urlsplit(server_url)
        user = parts.username or "postgres"
        query = f"?{parts.query}" if parts.query else ""
        return f"postgresql://{user}@{self.host}:{self.port}/{database}{query}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def pgbouncer_binary() -> str:
    """The PgBouncer binary to run; ``RuntimeError`` with one line saying how to get it when there is none."""
    found = os.environ.get("PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(found).is_file():
        raise RuntimeError(
            "pgbouncer not found: `make test` installs it (Debian package pgbouncer), or set PGBOUNCER=/path"
        )
    return found


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _config(server_url: str, port: int, directory: Path) -> str:
    parts = urlsplit(server_url)
    server_host = parts.hostname or "127.0.0.1"
    server_port = parts.port or 5432
    return f"""\
[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "users.txt"}
pool_mode = transaction
server_round_robin = 1
min_pool_size = 2
default_pool_size = 20
max_client_conn = 400
autodb_idle_timeout = 10
server_idle_timeout = 10
server_connect_timeout = 5
ignore_startup_parameters = extra_float_digits,options
logfile = {directory / "pgbouncer.log"}
pidfile = {directory / "pgbouncer.pid"}
"""


def start_pgbouncer(server_url: str) -> PgBouncer:
    """Starts a PgBouncer in front of ``server_url``'s server and waits until it accepts connections."""
    binary = pgbouncer_binary()
    directory = Path(tempfile.mkdtemp(prefix="gatefill-pgbouncer-"))
    port = _free_port("127.0.0.1")
    user = urlsplit(server_url).username or "postgres"
    (directory / "users.txt").write_text(f'"{user}" ""\n', encoding="utf-8")
    (directory / "pgbouncer.ini").write_text(_config(server_url, port, directory), encoding="utf-8")
    command = [binary, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:
        # PgBouncer will not run as root; the postgres user (Debian's) owns its files instead.
        shutil.chown(directory, user="postgres")
        for path in directory.iterdir():
            shutil.chown(path, user="postgres")
        directory.chmod(0o755)
        command = ["runuser", "-u", "postgres", "--", *command]
    # Not daemonised, it logs to stderr as well: into a file, as a pipe nobody reads would fill and stall it.
    with (directory / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    bouncer = PgBouncer("127.0.0.1", port, directory, process)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = (directory / "stderr.log").read_text(errors="replace").strip().splitlines()
            shutil.rmtree(directory, ignore_errors=True)
            raise RuntimeError(f"pgbouncer exited at start: {err[-1] if err else 'no output'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return bouncer
        except OSError:
            time.sleep(0.05)
    bouncer.stop()
    raise RuntimeError("pgbouncer did not start listening within 10 s")
