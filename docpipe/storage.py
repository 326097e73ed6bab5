"""One storage interface for local folders and ``s3://bucket/prefix`` locations.

``open_storage(uri)`` returns a store rooted at ``uri``; keys are ``/``-separated paths
relative to that root. Writes are atomic (a local temp file renamed into place; an S3
PUT is atomic by nature). S3 calls retry with backoff through botocore's standard retry
mode and every attempt is bounded by connect and read timeouts (``S3Config``), so a store
that stops answering fails a call within ``S3Config.call_bound_s()``; such failures raise
``StorageUnavailable``, which callers must not mistake for a missing or bad object. The
endpoint is configurable for MinIO or moto, credentials come from the environment.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from docpipe.config import S3Config
from docpipe.locking import LOCK_SUFFIX

_CHUNK = 1 << 20
_MISSING = ("404", "NoSuchKey", "NotFound")  # how S3 APIs say an object is not there


def absolute_location(uri: str) -> str:
    """A store's location as other processes can use it: a URI as it is, a local path made absolute."""
    return uri if "://" in uri else str(Path(uri).resolve())


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


class StorageUnavailable(StorageError):
    """The store did not answer, or failed on its side, after every attempt: nothing is known of the object."""


def _check_key(key: str) -> str:
    """``key`` normalised (no empty or ``.`` parts); StorageError where it would leave the root."""
    parts = [part for part in key.split("/") if part not in ("", ".")]
    if not parts or key.startswith("/") or ".." in parts:
        raise StorageError(f"invalid key {key!r}: keys are relative paths without '..'")
    return "/".join(parts)


class Storage(Protocol):
    uri: str

    def uri_of(self, key: str) -> str: ...
    def child(self, key: str) -> Storage: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> None: ...
    def sync(self) -> None: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...
    def sha256(self, key: str) -> str: ...


class LocalStorage:
    """A local folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)
        self._folders: set[str] = set()  # folders known to exist: one mkdir each, not one per write

    def uri_of(self, key: str) -> str:
        return os.path.join(self.uri, _check_key(key))

    def child(self, key: str) -> LocalStorage:
        return LocalStorage(self.root / _check_key(key))

    @functools.cached_property
    def _real_root(self) -> str:
        return os.path.realpath(self.uri)

    def _inside(self, key: str) -> str:
        """The path of ``key``, refusing symbolic links that lead outside the root."""
        path = self.uri_of(key)
        real = os.path.realpath(path)
        if os.path.commonpath([real, self._real_root]) != self._real_root:
            raise StorageError(f"{path}: a symbolic link pointing outside {self.root}")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            with open(self._inside(key), "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise StorageError(f"{self.uri_of(key)}: cannot read: {exc.strerror or exc}") from exc

    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> None:
        """Write through a temporary file renamed into place. ``durable=False`` skips the fsync
        for bulk writes that a later ``sync()`` makes durable before anything refers to them."""
        target = self.uri_of(key)
        folder, name = os.path.split(target)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        # a name no other writer picks (a crashed run may have left one); the mode open() would give
        tmp = os.path.join(folder, f".{name}.{os.urandom(6).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def sync(self) -> None:
        os.sync()

    def delete(self, key: str) -> None:
        Path(self._inside(key)).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.uri_of(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root / _check_key(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.endswith((".tmp", LOCK_SUFFIX)):  # not writes in progress, locks
                yield path.relative_to(self.root).as_posix()

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        try:
            with open(self._inside(key), "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise StorageError(f"{self.uri_of(key)}: cannot read: {exc.strerror or exc}") from exc
        return digest.hexdigest()


def s3_client(settings: S3Config):
    """A boto3 S3 client with standard-mode retries (exponential backoff with jitter) and timeouts."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
        ),
    )


@contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """botocore's errors as StorageError naming ``uri``; StorageUnavailable where the store itself failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        detail = f"{error.get('Code')} {error.get('Message', '')}".rstrip()
        kind = StorageUnavailable if status >= 500 else StorageError
        raise kind(f"{uri}: cannot {action}: {detail}") from exc
    except BotoCoreError as exc:  # no connection, a timeout, a cut-off response: after every attempt
        raise StorageUnavailable(f"{uri}: cannot {action}: {exc}") from exc


class S3Storage:
    """A prefix in an S3 bucket (AWS, MinIO, or moto)."""

    def __init__(self, bucket: str, prefix: str, client):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def child(self, key: str) -> S3Storage:
        return S3Storage(self.bucket, self._key(key), self.client)

    def read_bytes(self, key: str) -> bytes:
        with _s3_errors(self.uri_of(key), "read"):  # reading the body can time out too
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> None:
        """A PUT is atomic and durable once it returns, whatever ``durable`` says."""
        with _s3_errors(self.uri_of(key), "write"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def sync(self) -> None:
        """Nothing to do: every PUT is durable when it returns."""

    def delete(self, key: str) -> None:
        with _s3_errors(self.uri_of(key), "delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with _s3_errors(self.uri_of(key), "check"):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except StorageError as exc:
            cause = exc.__cause__
            missing = isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in _MISSING
            if missing:
                return False
            raise
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        start = f"{self._key(prefix)}/" if prefix else root
        with _s3_errors(self.uri, "list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    yield item["Key"][len(root) :]

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with _s3_errors(self.uri_of(key), "read"):
            for chunk in self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].iter_chunks(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


def open_storage(uri: str | Path, s3: S3Config | None = None, client=None) -> Storage:
    """The store rooted at a local path or an ``s3://bucket/prefix`` URI."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{text}: an s3:// URI needs a bucket")
        return S3Storage(parsed.netloc, parsed.path, client or s3_client(s3 or S3Config()))
    if parsed.scheme in ("", "file"):
        return LocalStorage(parsed.path if parsed.scheme == "file" else text)
    raise StorageError(f"{text}: unsupported scheme {parsed.scheme!r} (use a local path or s3://)")
