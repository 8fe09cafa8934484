# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The S3 backend's low-level layer: s3:// URLs, the options modules take, and a
Store rooted at s3://bucket/prefix with the few operations a repository needs
(small objects, listings, deletes, multipart writes in bounded memory, streaming
and parallel reads). Every failure becomes an S3Error that names the operation,
the object and the server's own error code.

boto3 is imported only when a Store is made: importing this module never needs it,
so a file repository works on a host without boto3.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import os
import re
import sys
import threading
import zlib

from ._errors import PgopsError

MiB = 1024 * 1024
# S3's limits: every part but the last is at least 5 MiB, at most 5 GiB, at most 10,000 parts.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10000
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_CONCURRENCY = 2
MAX_KEY_BYTES = 1024
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys

# The client's timeouts and retries: a dead or unreachable endpoint fails a call within
# about 3 x (10 s connect or 60 s read) instead of hanging a backup.
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60
MAX_ATTEMPTS = 3
# Every part upload and ranged read is one pooled connection; more than botocore's default 10.
MAX_POOL_CONNECTIONS = 32

S3_OPTION_SPEC = {
    "s3_endpoint": {"type": "str"},
    "s3_region": {"type": "str", "default": "us-east-1"},
    "s3_access_key": {"type": "str", "no_log": True},
    "s3_secret_key": {"type": "str", "no_log": True},
    "s3_ca_bundle": {"type": "path"},
    "s3_verify_tls": {"type": "bool", "default": True},
    "s3_profile": {"type": "str"},
}

# Error codes that mean "these credentials are wrong", whichever server says it.
_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId")
_DENIED_CODES = ("AccessDenied", "AllAccessDisabled", "403")
_MISSING_CODES = ("NoSuchKey", "NotFound", "404")
# A conditional PUT that lost: the object exists (412), or another conditional write is in progress (409).
_CONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

_BUCKET_CHARS_RE = re.compile(r"^[a-z0-9.-]+$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_ENDPOINT_RE = re.compile(r"^https?://[^/\s]+/?$")


class S3Error(PgopsError):
    """An S3 repository cannot be reached, refuses us, or an operation on it failed."""


# -- URLs and paths: pure functions


def is_s3(url) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


def bucket_name_error(bucket: str) -> str | None:
    """Which of S3's bucket naming rules bucket breaks, or None."""
    if not bucket:
        return "the bucket name is missing"
    if not 3 <= len(bucket) <= 63:
        return "a bucket name has 3 to 63 characters"
    if not _BUCKET_CHARS_RE.match(bucket):
        return "a bucket name has only lowercase letters, digits, dots and hyphens"
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        return "a bucket name starts and ends with a lowercase letter or a digit"
    if ".." in bucket:
        return "a bucket name has no two adjacent dots"
    if _IPV4_RE.match(bucket):
        return "a bucket name is not an IP address"
    return None


def rel_error(rel) -> str | None:
    """Why rel is not a path inside a repository (a/b/c, no '.', '..' or empty segment), or None."""
    if not isinstance(rel, str) or not rel:
        return "a path is not empty"
    if rel.startswith("/"):
        return "a path is relative (no leading '/')"
    if "\\" in rel:
        return "a path has no backslash"
    if _CONTROL_RE.search(rel):
        return "a path has no control character"
    for segment in rel.split("/"):
        if segment == "":
            return "a path has no empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return "a path has no '.' or '..' segment"
    return None


def check_rel(rel) -> str:
    why = rel_error(rel)
    if why:
        raise S3Error(f"invalid path {rel!r} in an S3 repository: {why}")
    return rel


def check_rel_prefix(rel_prefix) -> str:
    """A listing prefix: empty, or a path that may end with '/'."""
    if rel_prefix == "":
        return rel_prefix
    why = rel_error(rel_prefix[:-1] if isinstance(rel_prefix, str) and rel_prefix.endswith("/") else rel_prefix)
    if why:
        raise S3Error(f"invalid prefix {rel_prefix!r} in an S3 repository: {why}")
    return rel_prefix


def parse_url(url) -> tuple:
    """s3://bucket/some/prefix/ -> ("bucket", "some/prefix"); s3://bucket -> ("bucket", "")."""
    if not is_s3(url):
        raise S3Error(f"{url!r} is not an S3 URL: expected s3://bucket or s3://bucket/prefix")
    bucket, _sep, prefix = url[len("s3://") :].partition("/")
    why = bucket_name_error(bucket)
    if why:
        raise S3Error(f"invalid S3 URL {url}: bucket {bucket!r}: {why}")
    if prefix.endswith("/"):
        prefix = prefix[:-1]
    if prefix:
        why = rel_error(prefix)
        if why:
            raise S3Error(f"invalid S3 URL {url}: prefix {prefix!r}: {why}")
    return bucket, prefix


def part_size_for(expected_size: int, part_size: int = DEFAULT_PART_SIZE) -> int:
    """A part size (a whole number of MiB, at least part_size) that fits an object of
    twice expected_size into S3's 10,000 parts: a stream's final size is only an estimate."""
    needed = -(-2 * max(int(expected_size), 0) // MAX_PARTS)
    size = max(part_size, MIN_PART_SIZE, needed)
    return min(-(-size // MiB) * MiB, MAX_PART_SIZE)


# -- options


def config_from_params(params: dict) -> dict:
    """A Store's config from a module's parameters (S3_OPTION_SPEC)."""
    verify = params.get("s3_verify_tls")
    return {
        "endpoint": params.get("s3_endpoint") or None,
        "region": params.get("s3_region") or "us-east-1",
        "access_key": params.get("s3_access_key") or None,
        "secret_key": params.get("s3_secret_key") or None,
        "ca_bundle": params.get("s3_ca_bundle") or None,
        "verify_tls": True if verify is None else bool(verify),
        "profile": params.get("s3_profile") or None,
    }


def _import_boto3():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise S3Error(
            "an s3:// repository needs the Python package boto3 on this host: "
            f"apt-get install python3-boto3 (or pip install boto3 for {sys.executable})"
        ) from exc
    return boto3, Config


def _make_client(config: dict):
    boto3, Config = _import_boto3()
    from botocore.exceptions import BotoCoreError

    access, secret = config.get("access_key"), config.get("secret_key")
    if bool(access) != bool(secret):
        raise S3Error(
            "set both s3_access_key and s3_secret_key, or neither "
            "(then AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, s3_profile or AWS_PROFILE are used)"
        )
    endpoint = config.get("endpoint") or None
    if endpoint and not _ENDPOINT_RE.match(endpoint):
        raise S3Error(f"s3_endpoint {endpoint!r} is not an endpoint URL: expected http(s)://host[:port]")
    ca_bundle = config.get("ca_bundle") or None
    if ca_bundle and not os.path.isfile(ca_bundle):
        raise S3Error(
            f"s3_ca_bundle {ca_bundle} is not a file: give the PEM file of the CA that signed the endpoint's certificate"
        )
    try:
        session = boto3.session.Session(profile_name=config.get("profile") or None)
        return session.client(
            "s3",
            endpoint_url=endpoint,
            region_name=config.get("region") or "us-east-1",
            aws_access_key_id=access or None,
            aws_secret_access_key=secret or None,
            verify=ca_bundle or bool(config.get("verify_tls", True)),
            config=Config(
                # Path-style (endpoint/bucket/key) works on every S3-compatible server and with dotted bucket names.
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                max_pool_connections=MAX_POOL_CONNECTIONS,
            ),
        )
    except (BotoCoreError, ValueError) as exc:
        raise S3Error(f"cannot set up an S3 client for {endpoint or 'AWS'}: {exc}") from exc


def crc32_b64(data) -> str:
    """The x-amz-checksum-crc32 value of data. We send it as a header ourselves: botocore would
    send it as an aws-chunked trailer over https, which SeaweedFS refuses from botocore 1.29
    (Debian 12's) as a signature mismatch, and botocore < 1.36 sends no checksum at all."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


def _error_code(exc) -> str:
    """The server's error code of a ClientError, or of the ClientError an S3Error was raised from ("" otherwise)."""
    for err in (exc, getattr(exc, "__cause__", None)):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code") or "")
    return ""


def _stream_errors() -> tuple:
    """What reading a response body can raise (botocore wraps some, urllib3 raises others)."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return (BotoCoreError, HTTPError, OSError)


class Store:
    """A repository rooted at s3://bucket/prefix. Every path argument is relative to
    the prefix: "20261201T101500Z/backup.json", "wal/7312.../000000010000000000000003.zst".

    config: endpoint (None: AWS), region, access_key and secret_key (None: boto3's
    default chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or profile),
    ca_bundle, verify_tls, profile; see config_from_params.
    """

    def __init__(self, url: str, config: dict | None = None):
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.config = dict(config or {})
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._client = _make_client(self.config)
        self.endpoint = self._client.meta.endpoint_url
        # If-None-Match is set as a header: the PutObject parameter exists only in botocore >= 1.35
        # and Debian 12's python3-boto3 is older. The flag is per thread, the client is shared.
        self._local = threading.local()
        self._client.meta.events.register("before-sign.s3.PutObject", self._add_condition)

    def __repr__(self) -> str:
        return f"Store({self.url!r}, endpoint={self.endpoint!r})"

    @property
    def client(self):
        """The boto3 client (for what this class does not wrap)."""
        return self._client

    def _add_condition(self, request, **_kwargs) -> None:
        if getattr(self._local, "if_none_match", False):
            request.headers["If-None-Match"] = "*"

    # -- names

    def key(self, rel: str) -> str:
        """The object key of a path in the repository."""
        key = self._root + check_rel(rel)
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise S3Error(f"the key of {rel!r} in {self.url} is longer than S3's {MAX_KEY_BYTES} bytes")
        return key

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._root}{rel}"

    def _rel(self, key: str) -> str:
        return key[len(self._root) :]

    # -- errors

    def _explain(self, exc, what: str) -> S3Error:
        """An S3Error for a botocore error of the operation what ("PUT s3://b/k"): the
        operation, the object and the server's code, and for the usual causes what to do."""
        from botocore import exceptions as bce

        ep = self.endpoint
        if isinstance(exc, S3Error):
            return exc
        if isinstance(exc, bce.ClientError):
            response = getattr(exc, "response", None) or {}
            err = response.get("Error") or {}
            code = str(err.get("Code") or "")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            message = err.get("Message") or ""
            detail = f"{code}: {message}" if message and message != code else code or f"HTTP {status}"
            if code in _CREDENTIAL_CODES:
                return S3Error(f"the S3 credentials were refused by {ep} ({code}): check s3_access_key/s3_secret_key ({what})")
            if code == "AuthorizationHeaderMalformed":
                return S3Error(f"{ep} refused the request's signature ({detail}): check s3_region ({what})")
            if code == "NoSuchBucket":
                return S3Error(f"bucket {self.bucket} does not exist at {ep}: create it first ({what}: NoSuchBucket)")
            if code in _DENIED_CODES:
                return S3Error(
                    f"access denied by {ep} to {what} ({code}): the credentials need read, write, list and delete "
                    f"rights on s3://{self.bucket}/{self._root}"
                )
            if code == "NoSuchUpload":
                return S3Error(f"{what}: the multipart upload no longer exists at {ep} (aborted or expired) ({code})")
            if code in _MISSING_CODES:
                return S3Error(f"{what}: no such object at {ep} ({code})")
            return S3Error(f"{what} failed at {ep}: {detail}")
        if isinstance(exc, bce.SSLError):
            return S3Error(
                f"TLS with the S3 endpoint {ep} failed ({what}): {exc}: set s3_ca_bundle to the PEM file of the CA "
                "that signed its certificate (or check that the endpoint speaks https)"
            )
        if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ConnectionClosedError)):
            return S3Error(f"cannot reach the S3 endpoint {ep}: {exc} ({what})")
        if isinstance(exc, bce.ReadTimeoutError):
            return S3Error(f"the S3 endpoint {ep} did not answer {what} within {READ_TIMEOUT} s: {exc}")
        if isinstance(exc, bce.NoCredentialsError):
            return S3Error(
                f"no S3 credentials for {what}: set s3_access_key and s3_secret_key, "
                "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or s3_profile"
            )
        return S3Error(f"{what} failed at {ep}: {type(exc).__name__}: {exc}")

    def _call(self, what: str, method: str, **kwargs):
        """client.method(**kwargs), every botocore error turned into an S3Error."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._explain(exc, what) from exc

    # -- the bucket

    def check(self) -> None:
        """Prove the bucket exists and the credentials may read and list it, before anything is written."""
        from botocore.exceptions import BotoCoreError, ClientError

        what = f"HEAD s3://{self.bucket}"
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            # A HEAD answer has no body, only its status (403, 404): a listing gets the server's code.
            try:
                self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._root, MaxKeys=1)
            except (ClientError, BotoCoreError) as detail:
                raise self._explain(detail, f"LIST s3://{self.bucket}/{self._root}") from detail
            if _error_code(exc) in ("404", "NoSuchBucket"):
                raise S3Error(f"bucket {self.bucket} does not exist at {self.endpoint}: create it first ({what}: 404)") from exc
            raise self._explain(exc, what) from exc
        except BotoCoreError as exc:
            raise self._explain(exc, what) from exc
        self._call(f"LIST s3://{self.bucket}/{self._root}", "list_objects_v2", Bucket=self.bucket, Prefix=self._root, MaxKeys=1)

    # -- small objects

    def put_bytes(self, rel: str, data: bytes, if_none_match: bool = False) -> bool:
        """Write an object. With if_none_match only if no object has this name: False when
        one exists (then it is left as it was). A retried request whose first attempt was
        written also answers False: compare the content when it matters."""
        key = self.key(rel)
        data = data if isinstance(data, bytes) else bytes(data)
        self._local.if_none_match = if_none_match
        try:
            self._call(
                f"PUT {self.uri(rel)}", "put_object", Bucket=self.bucket, Key=key, Body=data, ChecksumCRC32=crc32_b64(data)
            )
        except S3Error as exc:
            if if_none_match and _error_code(exc) in _CONDITION_CODES:
                return False
            raise
        finally:
            self._local.if_none_match = False
        return True

    def get_bytes(self, rel: str) -> bytes | None:
        """An object's content; None when there is no such object."""
        key = self.key(rel)
        what = f"GET {self.uri(rel)}"
        try:
            response = self._call(what, "get_object", Bucket=self.bucket, Key=key)
        except S3Error as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise
        body = response["Body"]
        try:
            return body.read()
        except _stream_errors() as exc:
            raise self._explain(exc, what) from exc
        finally:
            body.close()

    def head(self, rel: str) -> int | None:
        """An object's size; None when there is no such object."""
        meta = self._head(rel)
        return None if meta is None else meta["ContentLength"]

    def _head(self, rel: str):
        try:
            return self._call(f"HEAD {self.uri(rel)}", "head_object", Bucket=self.bucket, Key=self.key(rel))
        except S3Error as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise

    def exists(self, rel: str) -> bool:
        return self._head(rel) is not None

    # -- listings and deletes

    def _pages(self, what: str, rel_prefix: str, delimiter: str | None):
        kwargs = {"Bucket": self.bucket, "Prefix": self._root + check_rel_prefix(rel_prefix)}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            page = self._call(what, "list_objects_v2", **kwargs)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    def list(self, rel_prefix: str = "", delimiter: str | None = None) -> list:
        """[(path, size)] of the objects whose path starts with rel_prefix (a plain prefix:
        "wal/1/00000001" matches every segment of that timeline), all pages, in key order.
        With a delimiter, objects below the next delimiter are left out."""
        out = []
        for page in self._pages(f"LIST s3://{self.bucket}/{self._root}{rel_prefix}", rel_prefix, delimiter):
            out.extend((self._rel(o["Key"]), o["Size"]) for o in page.get("Contents") or ())
        # Sorted here: AWS lists in key (UTF-8 byte) order, SeaweedFS directory by directory
        # ("a/x" before "a-1/x").
        return sorted(out)

    def list_detailed(self, rel_prefix: str = "", delimiter: str | None = None) -> list:
        """[(path, size, last modified as a Unix time)], like list()."""
        out = []
        for page in self._pages(f"LIST s3://{self.bucket}/{self._root}{rel_prefix}", rel_prefix, delimiter):
            out.extend((self._rel(o["Key"]), o["Size"], o["LastModified"].timestamp()) for o in page.get("Contents") or ())
        return sorted(out)

    def modified(self, rel: str) -> float | None:
        """An object's last-modified time (Unix time); None when there is no such object."""
        meta = self._head(rel)
        return None if meta is None else meta["LastModified"].timestamp()

    def list_dirs(self, rel_prefix: str = "", confirm: bool = True) -> list:
        """The names of the "directories" right below the directory rel_prefix ("" is the
        repository), sorted. confirm: leave out those without any object left: SeaweedFS
        keeps listing a directory for minutes after its last object was deleted, AWS does
        not (one small listing per name, on a few threads)."""
        base = rel_prefix if rel_prefix == "" or rel_prefix.endswith("/") else rel_prefix + "/"
        names = []
        for page in self._pages(f"LIST s3://{self.bucket}/{self._root}{base}", base, "/"):
            for common in page.get("CommonPrefixes") or ():
                name = self._rel(common["Prefix"])[len(base) :].rstrip("/")
                if name:
                    names.append(name)
        if confirm and names:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(names)), thread_name_prefix="s3-list") as pool:
                kept = list(pool.map(lambda name: self._has_objects(f"{base}{name}/"), names))
            names = [name for name, keep in zip(names, kept) if keep]
        return sorted(names)

    def _has_objects(self, rel_prefix: str) -> bool:
        page = self._call(
            f"LIST s3://{self.bucket}/{self._root}{rel_prefix}",
            "list_objects_v2",
            Bucket=self.bucket,
            Prefix=self._root + rel_prefix,
            MaxKeys=1,
        )
        return bool(page.get("Contents"))

    def delete(self, rels) -> None:
        """Delete objects (missing ones are no error), 1000 per request; S3Error naming the
        keys the server refused to delete."""
        keys = [self.key(r) for r in rels]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            response = self._call(
                f"DELETE {len(batch)} objects in s3://{self.bucket}/{self._root}",
                "delete_objects",
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                shown = ", ".join(f"{e.get('Key')} ({e.get('Code')}: {e.get('Message')})" for e in errors[:5])
                more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
                raise S3Error(f"{self.endpoint} did not delete {len(errors)} object(s) in s3://{self.bucket}: {shown}{more}")

    def delete_prefix(self, rel_dir: str) -> int:
        """Delete everything under the directory rel_dir ("20261201T101500Z" removes
        20261201T101500Z/..., never 20261201T101500Z-01/...); the number of objects deleted."""
        rel_dir = rel_dir[:-1] if rel_dir.endswith("/") else rel_dir
        check_rel(rel_dir)  # never "": that would be the whole repository
        names = [name for name, _size in self.list(rel_dir + "/")]
        self.delete(names)
        return len(names)

    # -- multipart uploads

    def open_write(self, rel: str, part_size: int = DEFAULT_PART_SIZE, concurrency: int = DEFAULT_CONCURRENCY):
        """A MultipartWriter for a new object rel (see there for memory and sizes)."""
        return MultipartWriter(self, rel, part_size=part_size, concurrency=concurrency)

    def multipart_uploads(self, rel_prefix: str = "") -> list:
        """[{"key": path, "upload_id", "initiated"}] of the unfinished multipart uploads under rel_prefix."""
        kwargs = {"Bucket": self.bucket, "Prefix": self._root + check_rel_prefix(rel_prefix)}
        out = []
        while True:
            page = self._call(f"LIST uploads in s3://{self.bucket}/{self._root}{rel_prefix}", "list_multipart_uploads", **kwargs)
            for upload in page.get("Uploads") or ():
                out.append(
                    {"key": self._rel(upload["Key"]), "upload_id": upload["UploadId"], "initiated": upload.get("Initiated")}
                )
            key_marker, id_marker = page.get("NextKeyMarker"), page.get("NextUploadIdMarker")
            if not page.get("IsTruncated") or not (key_marker or id_marker):
                return out
            kwargs["KeyMarker"], kwargs["UploadIdMarker"] = key_marker or "", id_marker or ""

    def abort_uploads(self, rel_prefix: str = "") -> int:
        """Abort the unfinished multipart uploads under rel_prefix (what a killed run left):
        the number aborted. Uploads that vanished meanwhile are not counted."""
        count = 0
        for upload in self.multipart_uploads(rel_prefix):
            try:
                self._call(
                    f"ABORT upload of {self.uri(upload['key'])}",
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=self._root + upload["key"],
                    UploadId=upload["upload_id"],
                )
            except S3Error as exc:
                if _error_code(exc) in ("NoSuchUpload",) + _MISSING_CODES:
                    continue
                raise
            count += 1
        return count

    # -- reads

    def open_read(self, rel: str) -> ObjectReader:
        """A readable file-like over the object's content, streamed; S3Error naming the key when missing."""
        what = f"GET {self.uri(rel)}"
        try:
            response = self._call(what, "get_object", Bucket=self.bucket, Key=self.key(rel))
        except S3Error as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise S3Error(f"{self.uri(rel)} does not exist at {self.endpoint}") from None
            raise
        return ObjectReader(self, what, response)

    def download(self, rel: str, target, parallel: int = 4, chunk: int = DEFAULT_PART_SIZE) -> int:
        """Copy an object to target with up to `parallel` ranged GETs of `chunk` bytes in
        flight, written in order (memory: about parallel x chunk). target: a file descriptor
        (a pipe works), an object with write(), or a path (created 0600, removed on
        failure). Ranges are read with If-Match on the object's ETag, so an object replaced
        meanwhile fails the copy instead of mixing two versions. The number of bytes written."""
        if parallel < 1 or chunk < 1:
            raise S3Error(f"download needs parallel >= 1 and chunk >= 1, not {parallel} and {chunk}")
        meta = self._head(rel)
        if meta is None:
            raise S3Error(f"{self.uri(rel)} does not exist at {self.endpoint}")
        size, etag = meta["ContentLength"], meta.get("ETag")
        path = fd = None
        if isinstance(target, int):
            write = _fd_writer(target)
        elif hasattr(target, "write"):
            write = target.write
        else:
            path = os.fspath(target)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
            write = _fd_writer(fd)
        try:
            written = self._download(rel, size, etag, write, parallel, chunk)
            if fd is not None:
                os.fsync(fd)
        except BaseException:
            if path is not None:
                os.close(fd)
                fd = None
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise
        finally:
            if fd is not None:
                os.close(fd)
        return written

    def _download(self, rel, size, etag, write, parallel, chunk) -> int:
        key = self.key(rel)
        ranges = [(start, min(start + chunk, size) - 1) for start in range(0, size, chunk)]
        written = 0
        pending = collections.deque()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="s3-get")
        try:
            for first, last in ranges:
                if len(pending) >= parallel:
                    data = pending.popleft().result()
                    write(data)
                    written += len(data)
                pending.append(pool.submit(self._get_range, rel, key, first, last, etag))
            while pending:
                data = pending.popleft().result()
                write(data)
                written += len(data)
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
        if written != size:
            raise S3Error(f"{self.uri(rel)}: read {written} bytes, expected {size}")
        return written

    def _get_range(self, rel, key, first, last, etag) -> bytes:
        what = f"GET {self.uri(rel)} bytes {first}-{last}"
        kwargs = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={first}-{last}"}
        if etag:
            kwargs["IfMatch"] = etag
        try:
            response = self._call(what, "get_object", **kwargs)
        except S3Error as exc:
            if _error_code(exc) in ("PreconditionFailed", "412"):
                raise S3Error(f"{self.uri(rel)} was replaced while it was being read ({what}): read it again") from None
            raise
        body = response["Body"]
        try:
            data = body.read()
        except _stream_errors() as exc:
            raise self._explain(exc, what) from exc
        finally:
            body.close()
        if len(data) != last - first + 1:
            raise S3Error(f"{what}: got {len(data)} bytes from {self.endpoint}, expected {last - first + 1}")
        return data


def _fd_writer(fd: int):
    def write(data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


class ObjectReader:
    """An object's content as a readable, streamed file-like: read(n), readinto(b),
    iteration by chunks, close(); size is the object's length. Errors while reading
    become S3Errors naming the object."""

    def __init__(self, store: Store, what: str, response: dict):
        self._store = store
        self._what = what
        self._body = response["Body"]
        self.size = response.get("ContentLength")
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        try:
            return self._body.read() if n is None or n < 0 else self._body.read(n)
        except _stream_errors() as exc:
            raise self._store._explain(exc, self._what) from exc

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def iter_chunks(self, chunk: int = MiB):
        while True:
            data = self.read(chunk)
            if not data:
                return
            yield data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._body.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> bool:
        self.close()
        return False


class MultipartWriter:
    """A new object written as a stream: write(bytes) as often as needed, then close().

    Parts of part_size bytes (at least S3's 5 MiB, at most 5 GiB) are uploaded on a
    small thread pool, at most `concurrency` at a time, while the next one fills. So the
    writer holds at most (concurrency + 1) x part_size bytes plus the chunk given to
    write(): memory_bound, 48 MiB at the defaults (16 MiB, 2), 15 MiB with 5 MiB parts
    (measured: the Python heap peaks about 3 MiB above memory_bound, whatever the size written).
    An object is at most 10,000 parts (max_size: 156 GiB at 16 MiB; see part_size_for).

    An object that fits in one part, an empty one included, is written with one PUT at
    close(). Any failure in write() or close() aborts the upload (best effort) and raises
    S3Error; abort() never raises. As a context manager, an exception inside aborts.
    bytes_written counts what write() accepted; peak_held is the most bytes held at once.
    """

    def __init__(self, store: Store, rel: str, part_size: int = DEFAULT_PART_SIZE, concurrency: int = DEFAULT_CONCURRENCY):
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise S3Error(f"an S3 part size is between 5 MiB and 5 GiB (S3's limits), not {part_size} bytes")
        if concurrency < 1:
            raise S3Error(f"a multipart upload needs a concurrency of at least 1, not {concurrency}")
        self._store = store
        self.rel = rel
        self.key = store.key(rel)
        self.part_size = part_size
        self.concurrency = concurrency
        self.memory_bound = (concurrency + 1) * part_size
        self.max_size = MAX_PARTS * part_size
        self.bytes_written = 0
        self.peak_held = 0
        self.upload_id = None
        self.closed = False
        self.abort_error = None  # why abort() could not abort the upload (it never raises)
        self._buf = bytearray()
        self._parts = []
        self._next_part = 1
        self._inflight = {}  # future -> part size
        self._pool = None
        self._failed = None

    def __repr__(self) -> str:
        return f"MultipartWriter({self._store.uri(self.rel)!r}, part_size={self.part_size})"

    # -- the pipeline

    def _held(self) -> int:
        return len(self._buf) + sum(self._inflight.values())

    def _start(self) -> None:
        response = self._store._call(
            f"CREATE multipart upload of {self._store.uri(self.rel)}",
            "create_multipart_upload",
            Bucket=self._store.bucket,
            Key=self.key,
            ChecksumAlgorithm="CRC32",
        )
        self.upload_id = response["UploadId"]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="s3-part")

    def _collect(self, done) -> None:
        for future in done:
            self._inflight.pop(future, None)
            self._parts.append(future.result())  # an S3Error from the part's upload

    def _wait_for_slot(self, slots: int) -> None:
        """Wait until fewer than `slots` parts are in flight."""
        while len(self._inflight) >= slots and self._inflight:
            done, _pending = concurrent.futures.wait(list(self._inflight), return_when=concurrent.futures.FIRST_COMPLETED)
            self._collect(done)

    def _send_part(self, size: int) -> None:
        """Upload the buffer's first size bytes as the next part."""
        if self.upload_id is None:
            self._start()
        if self._next_part > MAX_PARTS:
            raise S3Error(
                f"{self._store.uri(self.rel)} is larger than S3's {MAX_PARTS} parts of {self.part_size} bytes: "
                "use a larger part size"
            )
        # A free slot first, then the copy: buffer + this part + the others in flight stays within memory_bound.
        self._wait_for_slot(self.concurrency)
        with memoryview(self._buf) as view:
            data = bytes(view[:size])
        self.peak_held = max(self.peak_held, self._held() + len(data))
        del self._buf[:size]
        number, self._next_part = self._next_part, self._next_part + 1
        future = self._pool.submit(self._upload_part, number, data)
        self._inflight[future] = len(data)

    def _upload_part(self, number: int, data: bytes) -> dict:
        checksum = crc32_b64(data)
        response = self._store._call(
            f"PUT part {number} of {self._store.uri(self.rel)}",
            "upload_part",
            Bucket=self._store.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=data,
            ChecksumCRC32=checksum,
        )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": checksum}

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self.abort()

    # -- the interface

    def write(self, data) -> int:
        if self._failed is not None:
            raise S3Error(f"{self._store.uri(self.rel)}: write after a failed upload: {self._failed}")
        if self.closed:
            raise S3Error(f"{self._store.uri(self.rel)}: write after close or abort")
        try:
            self._buf += data
            self.bytes_written += len(data)
            self.peak_held = max(self.peak_held, self._held())
            while len(self._buf) >= self.part_size:
                self._send_part(self.part_size)
            # Collect finished parts now: a failed upload shows at the next write, not at close().
            self._collect([f for f in list(self._inflight) if f.done()])
        except BaseException as exc:
            self._fail(exc)
            raise
        return len(data)

    def close(self) -> None:
        """Upload what is left and complete the object; S3Error (upload aborted) on failure."""
        if self._failed is not None:
            raise S3Error(f"{self._store.uri(self.rel)}: close after a failed upload: {self._failed}")
        if self.closed:
            return
        store = self._store
        try:
            if self.upload_id is None:
                store._call(
                    f"PUT {store.uri(self.rel)}",
                    "put_object",
                    Bucket=store.bucket,
                    Key=self.key,
                    Body=bytes(self._buf),
                    ChecksumCRC32=crc32_b64(self._buf),
                )
            else:
                if self._buf:
                    self._send_part(len(self._buf))
                self._wait_for_slot(1)
                parts = sorted(self._parts, key=lambda p: p["PartNumber"])
                store._call(
                    f"COMPLETE multipart upload of {store.uri(self.rel)}",
                    "complete_multipart_upload",
                    Bucket=store.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                )
                # Cheap insurance against a server that assembled something else.
                size = store.head(self.rel)
                if size != self.bytes_written:
                    raise S3Error(
                        f"{store.uri(self.rel)} is {size} bytes at {store.endpoint} after the upload of {self.bytes_written}"
                    )
        except BaseException as exc:
            self._fail(exc)
            raise
        self.closed = True
        self._buf = bytearray()
        self._shutdown()

    def abort(self) -> None:
        """Stop and abort the upload: no part stays stored. Never raises (a failure to
        abort is kept in abort_error; Store.abort_uploads() cleans up later)."""
        if self.closed:
            return
        self.closed = True
        self._buf = bytearray()
        for future in list(self._inflight):
            future.cancel()
        self._shutdown()  # parts already being sent end within the client's timeouts
        self._inflight.clear()
        if self.upload_id is None:
            return
        try:
            self._store._call(
                f"ABORT multipart upload of {self._store.uri(self.rel)}",
                "abort_multipart_upload",
                Bucket=self._store.bucket,
                Key=self.key,
                UploadId=self.upload_id,
            )
        except S3Error as exc:
            if _error_code(exc) != "NoSuchUpload":
                self.abort_error = str(exc)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, _exc, _tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
