"""Finding a PostgreSQL server for the test suite.

Order (DEVELOPERS.md): ``TASKSESSION_TEST_DATABASE_URL`` if set; else a
throwaway cluster started from the PostgreSQL server binaries (``initdb`` /
``pg_ctl``) in a temporary directory on a free loopback port, run as a
non-root user when we are root, and stopped at the end; else ``None`` with the
reason, so PostgreSQL tests skip (or fail under ``TASKSESSION_REQUIRE_POSTGRES=1``).

Faults (restart, killed backends) may only be injected into a cluster we
started: :attr:`PostgresServer.self_started` says which one this is.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

ENV_URL = "TASKSESSION_TEST_DATABASE_URL"
ENV_REQUIRE = "TASKSESSION_REQUIRE_POSTGRES"
TEST_DATABASE = "tasksession_test"


@dataclass
class PostgresServer:
    """A PostgreSQL server the tests may use."""

    url: str  # postgresql+asyncpg://... of the test database
    self_started: bool
    data_dir: Path | None = None
    pg_ctl: str | None = None
    run_as: str | None = None
    log_file: Path | None = None
    _root: Path | None = field(default=None, repr=False)

    def admin_url(self) -> str:
        """URL of the maintenance database (to create/drop databases)."""
        return make_url(self.url).set(database="postgres").render_as_string(hide_password=False)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.pg_ctl is not None
        assert self.data_dir is not None
        return subprocess.run(
            [self.pg_ctl, "-D", str(self.data_dir), *args],
            user=self.run_as,
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def restart(self) -> None:
        """Restart the server (fast shutdown). Only for a cluster the tests started."""
        if not self.self_started:
            raise RuntimeError("refusing to restart a PostgreSQL server the tests did not start")
        self._pg_ctl("-m", "fast", "-w", "-t", "30", "restart", "-l", str(self.log_file))

    def shut_down(self, mode: str = "fast") -> None:
        """Stop the server and keep its data: connects are refused until :meth:`start_again`.

        Only for a cluster the tests started. ``mode`` is ``pg_ctl``'s shutdown
        mode (``fast``: terminate the sessions; ``immediate``: no clean shutdown).
        Waits (at most 30 s) until the server is down.
        """
        if not self.self_started:
            raise RuntimeError("refusing to stop a PostgreSQL server the tests did not start")
        self._pg_ctl("-m", mode, "-w", "-t", "30", "stop")

    def start_again(self) -> None:
        """Start the server :meth:`shut_down` stopped, with the options it ran with.

        Waits (at most 30 s) until it accepts connections.
        """
        if not self.self_started:
            raise RuntimeError("refusing to start a PostgreSQL server the tests did not start")
        assert self.data_dir is not None
        # postmaster.opts (written by the server at start, kept after a stop) is
        # its command line: the binary, then the options `pg_ctl restart` reuses.
        words = shlex.split((self.data_dir / "postmaster.opts").read_text())[1:]
        options: list[str] = []
        while words:
            word = words.pop(0)
            if word == "-D":  # pg_ctl passes -D itself
                words.pop(0)
                continue
            options.append(word)
        self._pg_ctl("-o", shlex.join(options), "-w", "-t", "30", "-l", str(self.log_file), "start")

    def is_running(self) -> bool:
        """Whether the server is up (``pg_ctl status``)."""
        return self._pg_ctl("status", check=False).returncode == 0

    def stop(self) -> None:
        if not self.self_started:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._pg_ctl("-m", "immediate", "-w", "-t", "30", "stop", check=False)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and found no unprivileged user to run PostgreSQL as")


#: Where throwaway clusters live when it exists: in memory (tmpfs). A cluster's files
#: are thrown away with it anyway, and creating and dropping many small files (each
#: CREATE DATABASE, TRUNCATE, DROP) was slow and grew slower run after run on this
#: machines' disk (ext4 without a journal: its inode allocator steps over every
#: recently deleted inode), which made clone-mode test isolation 2-9x slower.
MEMORY_DIR = Path("/dev/shm")


def _cluster_parent() -> str | None:
    if MEMORY_DIR.is_dir() and os.access(MEMORY_DIR, os.W_OK | os.X_OK):
        return str(MEMORY_DIR)
    return None  # the system's temporary directory


def start_cluster() -> PostgresServer:
    """Start a throwaway cluster; raises ``FileNotFoundError`` without server binaries."""
    initdb = _find_binary("initdb")
    pg_ctl = _find_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    user = _unprivileged_user()
    root = Path(tempfile.mkdtemp(prefix="tasksession-pg-", dir=_cluster_parent()))
    data_dir = root / "data"
    socket_dir = root / "socket"
    socket_dir.mkdir()
    log_file = root / "server.log"
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        log_file.touch()
        os.chown(log_file, entry.pw_uid, entry.pw_gid)
    subprocess.run(
        [
            initdb,
            "-D",
            str(data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        user=user,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    port = _free_port()
    options = " ".join(
        [
            f"-p {port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={socket_dir}",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=300",
            "-c shared_buffers=64MB",
            # lets the server notice a vanished client even mid-query
            "-c client_connection_check_interval=200ms",
        ]
    )
    server = PostgresServer(
        url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{TEST_DATABASE}",
        self_started=True,
        data_dir=data_dir,
        pg_ctl=pg_ctl,
        run_as=user,
        log_file=log_file,
        _root=root,
    )
    try:
        server._pg_ctl("-o", options, "-w", "-t", "60", "-l", str(log_file), "start")
        _create_database(server)
    except BaseException:
        server.stop()
        raise
    return server


def _create_database(server: PostgresServer) -> None:
    # The createdb binary, not a driver: this may run inside or outside an event loop.
    createdb = _find_binary("createdb")
    if createdb is None:
        raise FileNotFoundError("createdb not found next to initdb")
    url = make_url(server.url)
    subprocess.run(
        [createdb, "-h", str(url.host), "-p", str(url.port), "-U", "postgres", TEST_DATABASE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def find_server() -> tuple[PostgresServer | None, str]:
    """Return a server (or ``None``) and a sentence saying how it was found or why not."""
    url = os.environ.get(ENV_URL)
    if url:
        return PostgresServer(url=url, self_started=False), f"{ENV_URL}={url}"
    try:
        server = start_cluster()
    except FileNotFoundError as error:
        return None, (
            f"no PostgreSQL: {ENV_URL} is not set and {error} "
            "(install the PostgreSQL server package, or set the URL)"
        )
    except (subprocess.SubprocessError, OSError) as error:
        detail = getattr(error, "stderr", "") or ""
        return None, f"no PostgreSQL: starting a throwaway cluster failed: {error} {detail}"
    return server, f"throwaway cluster at {server.url}"
