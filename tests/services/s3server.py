"""Moved to ``npo.devservices.s3server`` (shared with ``python -m npo.devservices``);
re-exported here for old imports."""

from npo.devservices.s3server import S3Server, weed_binary

__all__ = ["S3Server", "weed_binary"]
