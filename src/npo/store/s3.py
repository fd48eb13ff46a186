"""``s3://bucket/prefix`` artifact store over any S3-compatible endpoint, through the minio SDK.

One client talks to AWS S3, MinIO, or the SeaweedFS that KFP >= 2.15 ships. Settings come
from the variables a Kubernetes Secret (or an AWS profile) injects; explicit keyword
arguments override them (see ``S3Settings.from_env`` for names and precedence)::

    store = open_store("s3://npo-artifacts/exp1")        # S3Settings.from_env()
    store = S3Store("s3://npo-artifacts/exp1", endpoint="http://127.0.0.1:8333",
                    access_key="...", secret_key="...", create_bucket=True)

Failure handling, in two layers whose numbers are all ``S3Settings`` fields:

- per HTTP request, urllib3 retries connection errors and 5xx answers with exponential
  backoff, under connect/read timeouts;
- per store operation, the whole operation (a multipart upload included) is re-run with
  exponential backoff when it still fails with a transient error, e.g. a connection reset
  mid-upload or a server that is restarting.

What reaches the caller is ONE ``StoreError`` naming the endpoint, the bucket and the
problem ("access denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY", "cannot reach
http://host:9000 (connection refused)"). It is raised outside the ``except`` block, so it
carries no chained SDK exceptions (whose texts could hold request details), and every text
it does carry is scrubbed of the access key, secret key and session token.

Objects are atomic per key as S3 guarantees: a single PUT or a completed multipart upload
appears whole or not at all. A failed multipart upload is aborted when the server still
answers; otherwise its parts stay invisible until a bucket lifecycle rule removes them.
Run the tests with ``pytest tests/test_s3_store.py`` (they start a real SeaweedFS server).
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from npo.store.artifacts import ArtifactNotFound, _atomic_writer, _check_key

T = TypeVar("T")
MiB = 1 << 20
AWS_ENDPOINT = "https://s3.amazonaws.com"

# Endpoint variables, first set wins: the AWS SDK's service-specific and global names, then
# the names other tools in the stack use (KFP/Argo manifests, MLflow's artifact store).
ENDPOINT_VARS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "S3_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
)
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
_TRUE = {"1", "true", "yes", "on"}

_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


class StoreError(RuntimeError):
    """An S3 operation failed for good; the message names endpoint, bucket and cause."""

    def __init__(self, message: str, *, endpoint: str, bucket: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.bucket = bucket


@dataclass(frozen=True)
class S3Settings:
    """How to reach the object store. Build with ``from_env``; fields are the overrides."""

    endpoint: str = AWS_ENDPOINT
    """``http(s)://host[:port]``; the scheme decides TLS."""
    access_key: str | None = field(default=None, repr=False)
    """AWS_ACCESS_KEY_ID; None (with no secret) for anonymous access."""
    secret_key: str | None = field(default=None, repr=False)
    """AWS_SECRET_ACCESS_KEY."""
    session_token: str | None = field(default=None, repr=False)
    """AWS_SESSION_TOKEN, for temporary credentials."""
    region: str | None = None
    """AWS_REGION; None lets the client ask the server for the bucket's region."""
    ca_bundle: str | None = None
    """PEM file of CAs to trust for https endpoints (AWS_CA_BUNDLE); default: certifi's."""
    insecure: bool = False
    """Skip TLS certificate verification (NPO_S3_INSECURE=1); for self-signed test setups."""
    connect_timeout: float = 10.0
    """Seconds to open a TCP/TLS connection."""
    read_timeout: float = 120.0
    """Seconds to wait for response bytes (a large part upload included)."""
    http_retries: int = 3
    """urllib3 retries of one request on connection errors and 5xx answers."""
    http_backoff: float = 0.5
    """urllib3 backoff factor: sleeps 0, 2x, 4x ... this between request retries."""
    max_attempts: int = 5
    """Attempts of a whole store operation (1 = no operation-level retry)."""
    retry_backoff: float = 1.0
    """Seconds before the 2nd operation attempt; doubles each time, capped below."""
    retry_backoff_max: float = 30.0
    """Cap of the operation-level backoff."""
    part_size: int = 16 * MiB
    """Multipart part size; files larger than this are uploaded in parts (S3 min 5 MiB)."""
    parallel_uploads: int = 3
    """Parts uploaded concurrently by one multipart upload."""

    def __post_init__(self) -> None:
        ep = urlparse(self.endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise ValueError(f"S3 endpoint {self.endpoint!r} must look like http(s)://host[:port]")
        if ep.username or ep.password:
            raise ValueError("S3 endpoint must not embed credentials; use AWS_ACCESS_KEY_ID etc.")
        if ep.path not in ("", "/") or ep.query:
            raise ValueError(f"S3 endpoint {self.endpoint!r} must not have a path or query")
        if bool(self.access_key) != bool(self.secret_key):
            raise ValueError(
                "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or neither: anonymous)"
            )
        if not 5 * MiB <= self.part_size <= 5 * 1024 * MiB:
            raise ValueError(f"part_size must be between 5 MiB and 5 GiB, got {self.part_size}")
        if self.max_attempts < 1 or self.http_retries < 0 or self.parallel_uploads < 1:
            raise ValueError("max_attempts and parallel_uploads must be >= 1, http_retries >= 0")

    @property
    def secure(self) -> bool:
        return self.endpoint.startswith("https://")

    @property
    def netloc(self) -> str:
        return urlparse(self.endpoint).netloc

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> S3Settings:
        """Settings from environment variables; keyword arguments win over them.

        - endpoint: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, S3_ENDPOINT_URL,
          MLFLOW_S3_ENDPOINT_URL (first set wins), else AWS (https://s3.amazonaws.com);
        - access_key / secret_key / session_token: AWS_ACCESS_KEY_ID /
          AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN;
        - region: AWS_REGION, then AWS_DEFAULT_REGION;
        - ca_bundle: AWS_CA_BUNDLE; insecure: NPO_S3_INSECURE (1/true/yes/on);
        - every numeric field: NPO_S3_<FIELD>, e.g. NPO_S3_MAX_ATTEMPTS, NPO_S3_PART_SIZE.
        """
        env = os.environ if environ is None else environ

        def first(names: tuple[str, ...]) -> str | None:
            return next((env[n] for n in names if env.get(n)), None)

        values: dict[str, object] = {
            "endpoint": first(ENDPOINT_VARS) or AWS_ENDPOINT,
            "access_key": env.get("AWS_ACCESS_KEY_ID") or None,
            "secret_key": env.get("AWS_SECRET_ACCESS_KEY") or None,
            "session_token": env.get("AWS_SESSION_TOKEN") or None,
            "region": first(REGION_VARS),
            "ca_bundle": env.get("AWS_CA_BUNDLE") or None,
            "insecure": env.get("NPO_S3_INSECURE", "").strip().lower() in _TRUE,
        }
        for f in dataclasses.fields(cls):
            raw = env.get(f"NPO_S3_{f.name.upper()}")
            if raw and f.type in ("int", "float"):
                try:
                    values[f.name] = (int if f.type == "int" else float)(raw)
                except ValueError:
                    raise ValueError(f"NPO_S3_{f.name.upper()}={raw!r} is not a {f.type}") from None
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown S3 settings: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def http_client(self) -> urllib3.PoolManager:
        """The pool minio sends through: our timeouts, request retries and TLS trust."""
        retry = urllib3.Retry(
            total=self.http_retries,
            backoff_factor=self.http_backoff,
            status_forcelist=(500, 502, 503, 504),
            raise_on_status=False,  # hand the last 5xx body to minio: it names the S3 error
        )
        return urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self.connect_timeout, read=self.read_timeout),
            retries=retry,
            maxsize=max(10, self.parallel_uploads),
            cert_reqs="CERT_NONE" if self.insecure else "CERT_REQUIRED",
            ca_certs=self.ca_bundle or os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the prefix may be empty."""
    parsed = urlparse(uri)
    if parsed.scheme.lower() != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ValueError(f"S3 store URI {uri!r} must look like s3://bucket[/prefix]")
    prefix = parsed.path.strip("/")
    if prefix:
        _check_key(prefix)  # same segment rules as keys: no '', '.', '..'
    return parsed.netloc, prefix


class S3Store:
    """An ``ArtifactStore`` over one bucket (and optional key prefix) of an S3 endpoint."""

    def __init__(
        self,
        uri: str,
        settings: S3Settings | None = None,
        *,
        create_bucket: bool = False,
        **overrides,
    ) -> None:
        """``overrides`` are ``S3Settings`` fields, applied over ``settings`` or the env."""
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        if settings is None:
            settings = S3Settings.from_env(**overrides)
        elif overrides:
            settings = dataclasses.replace(settings, **overrides)
        self.settings = settings
        self._bucket_seen = False  # set once the bucket is known to exist (see ``exists``)
        self._client = Minio(
            settings.netloc,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            session_token=settings.session_token,
            secure=settings.secure,
            region=settings.region,
            http_client=settings.http_client(),
        )
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.settings.endpoint!r})"

    # ----------------------------------------------------------------------- ArtifactStore
    def put_file(self, key: str, path: Path) -> None:
        name = self._name(key)
        self._run(
            f"upload of {key!r}",
            lambda: self._client.fput_object(
                self.bucket,
                name,
                str(path),
                part_size=self.settings.part_size,
                num_parallel_uploads=self.settings.parallel_uploads,
            ),
            key,
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._run(
            f"upload of {key!r}",
            lambda: self._client.put_object(  # a fresh stream per attempt
                self.bucket, name, io.BytesIO(data), len(data), part_size=self.settings.part_size
            ),
            key,
        )

    def get_file(self, key: str, path: Path) -> None:
        name = self._name(key)

        def download() -> None:
            resp = self._client.get_object(self.bucket, name)
            try:
                # Temp file + rename: a download cut short never shows up under ``path``.
                with _atomic_writer(Path(path)) as out:
                    for chunk in resp.stream(MiB):
                        out.write(chunk)
            finally:
                resp.close()
                resp.release_conn()

        self._run(f"download of {key!r}", download, key)

    def get_bytes(self, key: str) -> bytes:
        name = self._name(key)

        def read() -> bytes:
            resp = self._client.get_object(self.bucket, name)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._run(f"download of {key!r}", read, key)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._run(f"stat of {key!r}", lambda: self._client.stat_object(self.bucket, name), key)
        except ArtifactNotFound:
            # A HEAD 404 has no body, so a missing bucket looks like a missing key: rule it
            # out once, so that a wrong bucket name is an error, not an empty store.
            if not self._bucket_seen:
                exists = self._run("bucket check", lambda: self._client.bucket_exists(self.bucket))
                if not exists:
                    raise self._translate_missing_bucket() from None
                self._bucket_seen = True
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        full = self._full_prefix(prefix)
        cut = len(self._full_prefix(""))

        def names() -> list[str]:  # materialised inside the retry: the listing is lazy
            objs = self._client.list_objects(self.bucket, prefix=full, recursive=True)
            return [o.object_name for o in objs if not o.is_dir]

        return sorted(n[cut:] for n in self._run(f"listing of {prefix!r}", names))

    def delete_prefix(self, prefix: str) -> None:
        full = self._full_prefix(prefix)

        def delete() -> None:
            objs = self._client.list_objects(self.bucket, prefix=full, recursive=True)
            todo = [DeleteObject(o.object_name) for o in objs if not o.is_dir]
            failed = list(self._client.remove_objects(self.bucket, todo)) if todo else []
            if failed:
                raise self._error(
                    f"deleting {len(failed)} objects under {prefix!r}: "
                    f"{failed[0].code} on {failed[0].name!r}"
                )

        self._run(f"delete of prefix {prefix!r}", delete)

    # ----------------------------------------------------------------------- bucket
    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (init jobs and tests); idempotent."""

        def create() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket, location=self.settings.region)
            except S3Error as e:  # another job created it between the two calls
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._run("bucket creation", create)

    # ----------------------------------------------------------------------- internals
    def _name(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        if prefix.startswith("/"):
            raise ValueError(f"list prefix {prefix!r} must be relative")
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def _error(self, message: str) -> StoreError:
        return StoreError(self._scrub(message), endpoint=self.settings.endpoint, bucket=self.bucket)

    def _scrub(self, text: str) -> str:
        s = self.settings
        for secret in (s.secret_key, s.access_key, s.session_token):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _run(self, what: str, op: Callable[[], T], key: str | None = None) -> T:
        """Run ``op`` with operation-level retries; raise one translated, scrubbed error."""
        s = self.settings
        for attempt in range(1, s.max_attempts + 1):
            try:
                return op()
            except Exception as exc:  # translated below; anything unknown is re-raised as is
                error, transient = self._translate(exc, what, key)
            if not transient or attempt == s.max_attempts:
                break
            time.sleep(min(s.retry_backoff * 2 ** (attempt - 1), s.retry_backoff_max))
        if transient and attempt > 1:
            error = self._error(f"{error}; gave up after {attempt} attempts")
        # Raised here, outside the handler, so no SDK exception is chained to it.
        raise error

    def _translate_missing_bucket(self) -> StoreError:
        return self._error(
            f"S3 bucket {self.bucket!r} does not exist at {self.settings.endpoint}: "
            "create it (the Helm init job does) or pass create_bucket=True"
        )

    def _translate(self, exc: Exception, what: str, key: str | None) -> tuple[Exception, bool]:
        """(exception to raise, whether retrying may help) for a failed SDK call."""
        at = f"{self.settings.endpoint}, bucket {self.bucket!r}"
        if isinstance(exc, S3Error):
            code = exc.code or "?"
            if code == "NoSuchKey" and key is not None:
                return ArtifactNotFound(f"no object {key!r} in {self.uri}"), False
            if code == "NoSuchBucket":
                return self._translate_missing_bucket(), False
            if code in _AUTH_CODES:
                return self._error(
                    f"S3 access denied ({code}) at {at}, during {what}: "
                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                ), False
            return self._error(
                f"S3 {what} failed at {at}: {code}: {exc.message}"
            ), code in _TRANSIENT_CODES
        if isinstance(exc, ServerError):
            return self._error(
                f"S3 {what} failed at {at}: server error HTTP {exc.status_code}"
            ), exc.status_code >= 500
        if isinstance(exc, InvalidResponseError):
            status = getattr(exc, "_code", 0) or 0
            return self._error(
                f"S3 {what} failed at {at}: the endpoint answered HTTP {status} without an S3 "
                "XML body (is the endpoint URL an S3 API?)"
            ), status >= 500
        if isinstance(exc, StoreError):
            return exc, False
        reason = _network_reason(exc, self.settings)
        if reason is None:
            return exc, False  # a bug or bad argument, not the network: keep it as it is
        if reason.startswith("TLS"):
            return self._error(
                f"TLS failure talking to {at}: {reason}; set AWS_CA_BUNDLE to the CA file, "
                "or NPO_S3_INSECURE=1 for a test server"
            ), False
        return self._error(
            f"cannot reach {self.settings.endpoint} ({reason}) for {what} in bucket {self.bucket!r}"
        ), True


def _network_reason(exc: BaseException, s: S3Settings) -> str | None:
    """A short cause for a connection-level failure, or None if ``exc`` is not one."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:  # follow wrapped causes
        seen.append(cur)
        inner = cur.reason if isinstance(cur, MaxRetryError) else None
        cur = inner or cur.__cause__ or cur.__context__

    def has(*types: type, unless: tuple[type, ...] = ()) -> bool:
        return any(isinstance(e, types) and not isinstance(e, unless) for e in seen)

    if not has(urllib3.exceptions.HTTPError, OSError):
        return None
    # Most specific first: urllib3 wraps a refused connection in NewConnectionError, which
    # subclasses ConnectTimeoutError, and a connect timeout also carries a TimeoutError.
    if has(SSLError, ssl.SSLError):
        return "TLS error"
    if has(NameResolutionError, socket.gaierror):
        return "host name does not resolve"
    if has(ConnectionRefusedError):
        return "connection refused"
    if has(ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return "connection reset"
    if has(ConnectTimeoutError, unless=(NewConnectionError,)):
        return f"connect timed out after {s.connect_timeout:g}s"
    if has(ReadTimeoutError, TimeoutError):
        return f"no answer within {s.read_timeout:g}s"
    if has(ProtocolError):
        return "connection dropped"
    for e in seen:
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno).lower()
    return f"network error ({type(seen[0]).__name__})"
