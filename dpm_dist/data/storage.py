"""Reading whole objects from local paths, ``http(s)://`` and ``s3://`` with bounded retries.

S3 goes through fsspec/s3fs with the standard AWS credential chain (env vars, profile, instance role)
and an optional endpoint (MinIO, moto, Ceph). HTTP uses urllib with a timeout: unlike webdataset's
curl handler (30 retries × 30 s connect timeout) a dead server fails in seconds, naming the URL.
A missing object, refused access or missing S3 credentials is not retried; each retry is logged.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class StorageError(OSError):
    """A shard or manifest could not be read; the message names the URL."""


@dataclass(frozen=True)
class IOOptions:
    s3_endpoint: str | None = None
    retries: int = 3  # attempts in total
    backoff_s: float = 0.5  # first wait; doubles after every failed attempt
    timeout_s: float = 30.0


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "s3://"))


def local_path(url: str) -> str:
    """The file-system path of a local URL (``file:///x`` or ``/x``)."""
    return url[len("file://") :] if url.startswith("file://") else url


def join_url(root: str, name: str) -> str:
    """``root/name`` for a folder or a URL prefix."""
    return name if is_remote(name) or os.path.isabs(name) else f"{root.rstrip('/')}/{name}"


_S3: dict[tuple[int, str | None, float], Any] = {}
MAX_S3_CLIENTS = 8  # per process: one per (endpoint, timeout) in use; more is a leak, not a workload


def _s3fs(opts: IOOptions) -> Any:
    """One S3FileSystem per process (forked DataLoader workers get their own) and (endpoint, timeout); bounded."""
    import s3fs

    cache_key = (os.getpid(), opts.s3_endpoint, opts.timeout_s)
    if cache_key not in _S3:
        for key in [k for k in _S3 if k[0] != cache_key[0]]:  # a forked worker's copies of its parent's clients
            del _S3[key]
        while len(_S3) >= MAX_S3_CLIENTS:
            del _S3[next(iter(_S3))]  # the oldest
        config = {
            "connect_timeout": min(opts.timeout_s, 10.0),
            "read_timeout": opts.timeout_s,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        }  # no botocore retry: ours, with backoff
        client = {"endpoint_url": opts.s3_endpoint} if opts.s3_endpoint else {}
        fs = s3fs.S3FileSystem(client_kwargs=client, config_kwargs=config, skip_instance_cache=True)
        fs.retries = 1  # s3fs's own loop would add up to 5 tries per attempt
        _S3[cache_key] = fs
    return _S3[cache_key]


def _read_once(url: str, opts: IOOptions) -> bytes:
    if url.startswith("s3://"):
        return _s3fs(opts).cat_file(url[len("s3://") :])
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=opts.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"HTTP 404 for {url}") from exc
            if exc.code in (401, 403):
                raise PermissionError(f"HTTP {exc.code} for {url}") from exc
            raise
    with open(local_path(url), "rb") as f:
        return f.read()


def _no_credentials(exc: BaseException) -> bool:
    """botocore found no credentials anywhere in its chain (a local fact: retrying cannot help)."""
    try:
        from botocore.exceptions import NoCredentialsError
    except ImportError:
        return False
    return isinstance(exc, NoCredentialsError)


def no_credentials_message(url: str) -> str:
    return (
        f"{url}: no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
        f"(a profile in ~/.aws/credentials), or run with an instance role; the endpoint of MinIO/Ceph/moto "
        f"is data.s3_endpoint (dpm-shards verify --s3-endpoint)"
    )


def _size_once(url: str, opts: IOOptions) -> int | None:
    if url.startswith("s3://"):
        return int(_s3fs(opts).info(url[len("s3://") :])["size"])
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=opts.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                return int(length) if length is not None and length.isdigit() else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"HTTP 404 for {url}") from exc
            if exc.code in (401, 403):
                raise PermissionError(f"HTTP {exc.code} for {url}") from exc
            if exc.code in (405, 501):  # a server without HEAD: the size is checked when the shard is read
                return None
            raise
    return os.path.getsize(local_path(url))


def read_bytes(url: str, opts: IOOptions = IOOptions()) -> bytes:
    """The whole object at ``url``. Transient failures are retried ``opts.retries`` times in total."""
    return _retrying(_read_once, url, opts)


def object_size(url: str, opts: IOOptions = IOOptions()) -> int | None:
    """The size in bytes of the object at ``url`` without reading it (S3 HEAD, HTTP HEAD's Content-Length, stat),
    or None where the server does not say; raises :class:`StorageError` as :func:`read_bytes` does."""
    return _retrying(_size_once, url, opts)


def _retrying(once: Any, url: str, opts: IOOptions) -> Any:
    """``once(url, opts)``, transient failures retried ``opts.retries`` times in total with doubling waits."""
    delay, last = opts.backoff_s, None
    for attempt in range(1, max(1, opts.retries) + 1):
        try:
            return once(url, opts)
        except FileNotFoundError as exc:
            raise StorageError(f"shard or manifest {url} does not exist ({exc})") from exc
        except PermissionError as exc:
            raise StorageError(f"access to {url} was refused: check credentials/permissions ({exc})") from exc
        except Exception as exc:  # network errors come in many types (urllib, botocore, aiohttp)
            if _no_credentials(exc):
                raise StorageError(no_credentials_message(url)) from exc
            last = exc
            if attempt < opts.retries:
                log.warning(
                    "reading %s failed (attempt %d of %d: %s: %s); retrying in %.1f s",
                    url,
                    attempt,
                    opts.retries,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                time.sleep(delay)
                delay *= 2
    raise StorageError(f"{url} is unreachable after {opts.retries} attempts: {type(last).__name__}: {last}")
