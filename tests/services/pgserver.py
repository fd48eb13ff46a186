"""Moved to ``npo.devservices.pgserver`` (shared with ``python -m npo.devservices``);
re-exported here for old imports."""

from npo.devservices.pgserver import APP_USER, HOST, SUPERUSER, PgServer

__all__ = ["APP_USER", "HOST", "SUPERUSER", "PgServer"]
