"""The S3 backend's low-level layer (module_utils/_s3.py) against a real SeaweedFS:
objects, listings, deletes, conditional puts, multipart writes in bounded memory,
streaming and parallel reads, and the errors a user sees (bad keys, missing bucket,
unreachable or TLS-mismatched endpoint, a server killed mid-upload)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
import uuid

import pytest
from harness.ansible import NODE_PYTHON, collections_workspace
from harness.pg import free_port
from harness.s3 import SeaweedS3

s3 = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._s3")
S3Error = s3.S3Error
MiB = s3.MiB


@pytest.fixture(scope="module")
def bucket(s3_server):
    """This module's bucket on the shared server, removed with what it holds after the module.

    Its tests work in repositories of their own below it (store), not in buckets of their own:
    SeaweedFS takes ~0.2 s to grow a new bucket's volumes on its first write, ~10 s over the module."""
    name = s3_server.create_bucket(f"pgops-store-{uuid.uuid4().hex[:12]}")
    yield name
    s3_server.remove_bucket(name)


@pytest.fixture
def store(s3_server, bucket):
    """A repository of its own per test, two levels below the bucket; removed after the test."""
    top = f"t-{uuid.uuid4().hex[:12]}"
    yield s3.Store(f"s3://{bucket}/{top}/repo/", s3_server.store_config())
    s3_server.empty(bucket, f"{top}/")


def pattern(size: int, seed: int = 0) -> bytes:
    """Reproducible, incompressible-looking bytes (a hash chain), fast enough for tens of MiB."""
    out = bytearray()
    block = hashlib.sha512(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha512(block).digest()
        out += block * 64
    return bytes(out[:size])


def write_uneven(writer, data: bytes) -> None:
    """Feed data in chunks of uneven sizes, as os.read on a pipe would."""
    sizes = [MiB, 3000, 777 * 1024, 65536 + 7, 1]
    view = memoryview(data)
    i = 0
    while view:
        n = sizes[i % len(sizes)]
        writer.write(view[:n])
        view = view[n:]
        i += 1


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- pure functions: URLs, paths, options


def test_parse_url_accepts_bucket_and_prefix():
    assert s3.is_s3("s3://bucket/x") and not s3.is_s3("/var/backups") and not s3.is_s3(None)
    assert s3.parse_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert s3.parse_url("s3://my.bucket-1/p") == ("my.bucket-1", "p")
    assert s3.parse_url("s3://bucket") == ("bucket", "")
    assert s3.parse_url("s3://bucket/") == ("bucket", "")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/var/backups", "'/var/backups' is not an S3 URL: expected s3://bucket"),
        ("s3:///prefix", "invalid S3 URL s3:///prefix: bucket '': the bucket name is missing"),
        ("s3://ab/p", "invalid S3 URL s3://ab/p: bucket 'ab': a bucket name has 3 to 63 characters"),
        ("s3://" + "b" * 64, "a bucket name has 3 to 63 characters"),
        ("s3://My-Bucket/p", "bucket 'My-Bucket': a bucket name has only lowercase letters, digits, dots and hyphens"),
        ("s3://bucket_1/p", "a bucket name has only lowercase letters, digits, dots and hyphens"),
        ("s3://-bucket/p", "a bucket name starts and ends with a lowercase letter or a digit"),
        ("s3://bucket./p", "a bucket name starts and ends with a lowercase letter or a digit"),
        ("s3://my..bucket/p", "a bucket name has no two adjacent dots"),
        ("s3://192.168.5.4/p", "a bucket name is not an IP address"),
        ("s3://bucket/a/../b", "invalid S3 URL s3://bucket/a/../b: prefix 'a/../b': a path has no '.' or '..' segment"),
        ("s3://bucket/a//b", "prefix 'a//b': a path has no empty segment"),
        ("s3://bucket//a", "prefix '/a': a path is relative (no leading '/')"),
        ("s3://bucket/a\\b", "a path has no backslash"),
        ("s3://bucket/a\nb", "a path has no control character"),
    ],
)
def test_parse_url_refuses_with_the_rule(url, message):
    with pytest.raises(S3Error) as err:
        s3.parse_url(url)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("", "a path is not empty"),
        ("/abs/x", "a path is relative (no leading '/')"),
        ("a/../x", "a path has no '.' or '..' segment"),
        ("./x", "a path has no '.' or '..' segment"),
        ("a//x", "a path has no empty segment"),
        ("a/x/", "a path has no empty segment"),
        ("a\\x", "a path has no backslash"),
    ],
)
def test_paths_inside_the_repository_are_checked(rel, message):
    assert s3.rel_error(rel).startswith(message)
    with pytest.raises(S3Error) as err:
        s3.check_rel(rel)
    assert f"invalid path {rel!r} in an S3 repository: {message}" in str(err.value)


def test_valid_paths_and_prefixes():
    assert s3.rel_error("20261201T101500Z/backup.json") is None
    assert s3.rel_error("wal/7312/000000010000000000000003.zst") is None
    assert s3.check_rel_prefix("") == "" and s3.check_rel_prefix("wal/") == "wal/"
    with pytest.raises(S3Error, match="invalid prefix 'wal//' in an S3 repository"):
        s3.check_rel_prefix("wal//")


def test_part_size_for_fits_s3s_part_count():
    assert s3.part_size_for(0) == 16 * MiB
    assert s3.part_size_for(10 * 2**30) == 16 * MiB
    big = s3.part_size_for(2 * 2**40)  # 2 TiB: twice that must fit in 10,000 parts
    assert big % MiB == 0 and big * s3.MAX_PARTS >= 4 * 2**40
    assert s3.part_size_for(10**15) == s3.MAX_PART_SIZE


def test_option_spec_and_config_from_params():
    spec = s3.S3_OPTION_SPEC
    assert spec["s3_access_key"]["no_log"] and spec["s3_secret_key"]["no_log"]
    assert spec["s3_region"]["default"] == "us-east-1" and spec["s3_verify_tls"] == {"type": "bool", "default": True}
    assert spec["s3_ca_bundle"]["type"] == "path"
    params = {"s3_endpoint": "http://127.0.0.1:9000", "s3_region": None, "s3_access_key": "AK", "s3_secret_key": "SK"}
    assert s3.config_from_params(params) == {
        "endpoint": "http://127.0.0.1:9000",
        "region": "us-east-1",
        "access_key": "AK",
        "secret_key": "SK",
        "ca_bundle": None,
        "verify_tls": True,
        "profile": None,
    }


def test_bad_config_is_refused_before_any_request():
    with pytest.raises(S3Error, match="set both s3_access_key and s3_secret_key, or neither"):
        s3.Store("s3://bucket/p", {"endpoint": "http://127.0.0.1:1", "access_key": "AK"})
    with pytest.raises(S3Error, match="s3_endpoint '127.0.0.1:9000' is not an endpoint URL"):
        s3.Store("s3://bucket/p", {"endpoint": "127.0.0.1:9000"})
    with pytest.raises(S3Error, match="s3_ca_bundle /nonexistent/ca.pem is not a file"):
        s3.Store("s3://bucket/p", {"endpoint": "https://127.0.0.1:9000", "ca_bundle": "/nonexistent/ca.pem"})


def test_missing_boto3_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now raises ImportError
    assert s3.is_s3("s3://bucket/p")  # the module itself works without it
    with pytest.raises(S3Error) as err:
        s3.Store("s3://bucket/p", {"endpoint": "http://127.0.0.1:1"})
    assert "needs the Python package boto3 on this host: apt-get install python3-boto3 (or pip install boto3" in str(err.value)


# -- objects, listings, deletes


def test_put_get_head_list_and_delete(store, s3_server):
    store.check()
    objects = {
        "20261201T101500Z/backup.json": b'{"status": "running"}',
        "20261201T101500Z/base.tar.zst": b"x" * 1000,
        "20261201T101500Z-01/backup.json": b"{}",
        "wal/7312/000000010000000000000003.zst": b"seg3",
        "wal/7312/000000010000000000000004.zst": b"segment4",
        "wal/7312/00000002.history": b"h",
    }
    for rel, data in objects.items():
        assert store.put_bytes(rel, data) is True
    # The keys are below the store's prefix, nowhere else.
    raw = s3_server.client().list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "/")
    assert sorted(o["Key"] for o in raw["Contents"]) == sorted(f"{store.prefix}/{rel}" for rel in objects)

    assert store.get_bytes("20261201T101500Z/backup.json") == b'{"status": "running"}'
    assert store.get_bytes("20261201T101500Z/missing") is None
    assert store.head("wal/7312/000000010000000000000004.zst") == 8
    assert store.head("wal/7312/nothing") is None
    assert store.exists("20261201T101500Z-01/backup.json") and not store.exists("20261201T101500Z-01/base.tar")

    assert store.list() == sorted((rel, len(data)) for rel, data in objects.items())
    assert store.list("wal/7312/00000001") == [
        ("wal/7312/000000010000000000000003.zst", 4),
        ("wal/7312/000000010000000000000004.zst", 8),
    ]
    assert store.list("", delimiter="/") == []  # every object is in a "directory"
    assert store.list("wal/7312/", delimiter="/") == [
        ("wal/7312/000000010000000000000003.zst", 4),
        ("wal/7312/000000010000000000000004.zst", 8),
        ("wal/7312/00000002.history", 1),
    ]
    assert store.list_dirs() == ["20261201T101500Z", "20261201T101500Z-01", "wal"]
    assert store.list_dirs("wal") == ["7312"] == store.list_dirs("wal/")
    assert store.list_dirs("wal/7312") == []

    # A directory, never a name that merely starts the same way.
    assert store.delete_prefix("20261201T101500Z") == 2
    assert store.list_dirs() == ["20261201T101500Z-01", "wal"]
    assert store.get_bytes("20261201T101500Z-01/backup.json") == b"{}"
    with pytest.raises(S3Error, match="a path is not empty"):
        store.delete_prefix("")

    store.delete(["wal/7312/000000010000000000000003.zst", "wal/7312/never-existed"])
    assert [rel for rel, _ in store.list("wal/")] == ["wal/7312/000000010000000000000004.zst", "wal/7312/00000002.history"]
    with pytest.raises(S3Error, match=r"invalid path '\.\./escape' in an S3 repository"):
        store.put_bytes("../escape", b"x")
    with pytest.raises(S3Error, match="no leading '/'"):
        store.get_bytes("/etc/passwd")


def test_listing_and_deleting_more_than_one_page(store):
    names = [f"wal/1/{i:024X}" for i in range(1003)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda n: store.put_bytes(n, n.encode()), names))
    listed = store.list("wal/")
    assert [n for n, _ in listed] == names and {size for _, size in listed} == {len(names[0])}
    assert store.delete_prefix("wal") == 1003  # two DeleteObjects requests
    assert store.list() == []


def test_store_at_the_bucket_root(s3_server, s3_bucket):
    bucket = s3_bucket
    store = s3.Store(f"s3://{bucket}", s3_server.store_config())
    store.check()
    store.put_bytes("20261201T101500Z/backup.json", b"{}")
    assert s3_server.client().get_object(Bucket=bucket, Key="20261201T101500Z/backup.json")["Body"].read() == b"{}"
    assert store.list_dirs() == ["20261201T101500Z"]
    assert store.list() == [("20261201T101500Z/backup.json", 2)]


def test_conditional_put_keeps_the_first_content(store):
    assert store.put_bytes("wal/1/000000010000000000000001", b"first", if_none_match=True) is True
    assert store.put_bytes("wal/1/000000010000000000000001", b"second", if_none_match=True) is False
    assert store.get_bytes("wal/1/000000010000000000000001") == b"first"
    # Without the condition a put replaces.
    assert store.put_bytes("wal/1/000000010000000000000001", b"third") is True
    assert store.get_bytes("wal/1/000000010000000000000001") == b"third"


def test_conditional_put_race_has_one_winner(store):
    def attempt(i):
        return store.put_bytes("race/lock", f"writer {i}".encode(), if_none_match=True)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(16)))
    assert results.count(True) == 1, results
    assert store.get_bytes("race/lock") == f"writer {results.index(True)}".encode()


def test_crc32_checksums_are_sent(store):
    assert s3.crc32_b64(b"hello") == "NhCmhg=="  # 0x3610a686
    data = pattern(3000, seed=9)
    store.put_bytes("obj", data)
    head = store.client.head_object(Bucket=store.bucket, Key=store.key("obj"), ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == s3.crc32_b64(data)


# -- multipart writes and reads


def test_multipart_round_trip_in_bounded_memory(store, tmp_path):
    data = pattern(40 * MiB + 12345)
    writer = store.open_write("20261201T101500Z/base.tar.zst", part_size=5 * MiB, concurrency=2)
    assert writer.memory_bound == 15 * MiB
    tracemalloc.start()
    try:
        with writer:
            write_uneven(writer, data)
            assert store.multipart_uploads("20261201T101500Z/")[0]["key"] == "20261201T101500Z/base.tar.zst"
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert writer.bytes_written == len(data) and writer.closed
    # The parts held (buffer + in flight) stay within the bound plus one write() chunk ...
    assert writer.peak_held <= writer.memory_bound + MiB, writer.peak_held
    # ... and all Python allocations (HTTP layer included) far below the 40 MiB written.
    assert peak < writer.memory_bound + 8 * MiB, peak / MiB
    assert store.multipart_uploads() == []

    assert store.head("20261201T101500Z/base.tar.zst") == len(data)
    etag = store.client.head_object(Bucket=store.bucket, Key=store.key("20261201T101500Z/base.tar.zst"))["ETag"]
    assert etag.strip('"').endswith("-9")  # 8 parts of 5 MiB and the rest

    h = hashlib.sha256()
    with store.open_read("20261201T101500Z/base.tar.zst") as reader:
        assert reader.size == len(data)
        first = reader.read(10)
        h.update(first)
        for chunk in reader.iter_chunks(3 * MiB + 1):
            h.update(chunk)
    assert h.hexdigest() == sha(data)

    path = tmp_path / "base.tar.zst"
    assert store.download("20261201T101500Z/base.tar.zst", str(path), parallel=4, chunk=3 * MiB + 1) == len(data)
    assert sha(path.read_bytes()) == sha(data)
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    out = io.BytesIO()
    store.download("20261201T101500Z/base.tar.zst", out, parallel=3, chunk=7 * MiB)
    assert sha(out.getvalue()) == sha(data)

    # A pipe: ordered writes to a descriptor that only takes what the reader drains.
    r, w = os.pipe()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        drained = pool.submit(lambda: b"".join(iter(lambda: os.read(r, MiB), b"")))
        try:
            store.download("20261201T101500Z/base.tar.zst", w, parallel=4, chunk=2 * MiB)
        finally:
            os.close(w)
        assert sha(drained.result()) == sha(data)
    os.close(r)


def test_small_and_empty_objects_through_the_writer(store, tmp_path):
    with store.open_write("empty", part_size=5 * MiB) as writer:
        pass
    assert writer.upload_id is None and writer.bytes_written == 0
    assert store.head("empty") == 0 and store.get_bytes("empty") == b""
    with store.open_read("empty") as reader:
        assert reader.read() == b""
    target = tmp_path / "empty"
    target.write_bytes(b"old content")
    assert store.download("empty", str(target)) == 0 and target.read_bytes() == b""

    data = pattern(MiB + 5)
    with store.open_write("small", part_size=5 * MiB) as writer:
        write_uneven(writer, data)
    assert writer.upload_id is None  # one PUT, no multipart upload
    assert store.get_bytes("small") == data

    assert store.put_bytes("empty2", b"") and store.head("empty2") == 0


def test_exact_multiple_of_the_part_size(store):
    data = pattern(10 * MiB, seed=3)
    with store.open_write("two-parts", part_size=5 * MiB, concurrency=1) as writer:
        writer.write(data)
    assert writer.upload_id is not None
    assert store.get_bytes("two-parts") == data


def test_abort_leaves_no_upload_and_no_object(store):
    writer = store.open_write("aborted", part_size=5 * MiB)
    writer.write(pattern(12 * MiB))
    assert writer.upload_id is not None
    assert [u["key"] for u in store.multipart_uploads()] == ["aborted"]
    writer.abort()
    writer.abort()  # twice is fine
    assert writer.abort_error is None
    assert store.multipart_uploads() == [] and not store.exists("aborted")
    with pytest.raises(S3Error, match="write after close or abort"):
        writer.write(b"more")


def test_an_exception_inside_with_aborts(store):
    with pytest.raises(RuntimeError, match="copy failed"):
        with store.open_write("20261201T101500Z/base.tar", part_size=5 * MiB) as writer:
            writer.write(pattern(11 * MiB))
            raise RuntimeError("copy failed")
    assert writer.upload_id is not None and writer.closed
    assert store.multipart_uploads() == [] and store.list() == []


def test_part_size_follows_s3s_limits(store):
    with pytest.raises(S3Error, match="between 5 MiB and 5 GiB"):
        store.open_write("x", part_size=5 * MiB - 1)
    with pytest.raises(S3Error, match="concurrency of at least 1"):
        store.open_write("x", part_size=5 * MiB, concurrency=0)


def test_abort_uploads_cleans_what_a_killed_run_left(store, s3_server):
    client = s3_server.client()
    for name in ("20261201T101500Z/base.tar", "20261201T101500Z/16384.tar"):
        client.create_multipart_upload(Bucket=store.bucket, Key=store.key(name))
    other = client.create_multipart_upload(Bucket=store.bucket, Key="elsewhere/x")
    try:
        found = store.multipart_uploads()
        assert sorted(u["key"] for u in found) == ["20261201T101500Z/16384.tar", "20261201T101500Z/base.tar"]
        assert all(u["upload_id"] and u["initiated"] for u in found)
        assert store.abort_uploads("20261201T101500Z/") == 2
        assert store.multipart_uploads() == []
        # Outside the repository's prefix: untouched.
        assert [u["Key"] for u in client.list_multipart_uploads(Bucket=store.bucket, Prefix="elsewhere/").get("Uploads", [])] == [
            "elsewhere/x"
        ]
    finally:
        client.abort_multipart_upload(Bucket=store.bucket, Key="elsewhere/x", UploadId=other["UploadId"])


def test_open_read_of_a_missing_object_names_it(store):
    with pytest.raises(S3Error) as err:
        store.open_read("20261201T101500Z/backup_manifest")
    missing = f"s3://{store.bucket}/{store.prefix}/20261201T101500Z/backup_manifest"
    assert f"{missing} does not exist at {store.endpoint}" in str(err.value)
    with pytest.raises(S3Error, match="backup_manifest does not exist"):
        store.download("20261201T101500Z/backup_manifest", io.BytesIO())


def test_a_replaced_object_fails_a_ranged_read(store):
    store.put_bytes("obj", b"version one")
    etag = store.client.head_object(Bucket=store.bucket, Key=store.key("obj"))["ETag"]
    store.put_bytes("obj", b"version two")
    with pytest.raises(S3Error, match="was replaced while it was being read"):
        store._get_range("obj", store.key("obj"), 0, 3, etag)


# -- what the user sees when something is wrong


def test_wrong_secret_key_is_named(store, s3_server):
    bad = s3.Store(store.url, s3_server.store_config(secret_key="not-the-secret"))
    with pytest.raises(S3Error) as err:
        bad.check()
    message = str(err.value)
    assert f"the S3 credentials were refused by {s3_server.endpoint} (SignatureDoesNotMatch)" in message
    assert "check s3_access_key/s3_secret_key" in message
    with pytest.raises(S3Error, match=r"credentials were refused .*\(SignatureDoesNotMatch\)"):
        bad.put_bytes("x", b"x")
    assert store.list() == []


def test_unknown_access_key_is_named(store, s3_server):
    bad = s3.Store(store.url, s3_server.store_config(access_key="NOSUCHKEY0000000"))
    with pytest.raises(S3Error, match=r"the S3 credentials were refused by .* \(InvalidAccessKeyId\): check s3_access_key"):
        bad.check()


def test_missing_bucket_is_named(s3_server):
    store = s3.Store("s3://pgops-no-such-bucket/repo", s3_server.store_config())
    with pytest.raises(S3Error) as err:
        store.check()
    assert f"bucket pgops-no-such-bucket does not exist at {s3_server.endpoint}: create it first" in str(err.value)
    with pytest.raises(S3Error, match="bucket pgops-no-such-bucket does not exist"):
        store.put_bytes("x", b"x")
    assert "pgops-no-such-bucket" not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]


def test_credentials_from_the_environment_or_a_profile(store, s3_server, monkeypatch, tmp_path):
    """Without s3_access_key/s3_secret_key boto3's default chain is used: the environment,
    then a profile (s3_profile); with none at all the message says what to set."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[pgops]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = {s3_server.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    keyless = s3_server.store_config(access_key=None, secret_key=None)

    with pytest.raises(S3Error, match="no S3 credentials for .*: set s3_access_key and s3_secret_key"):
        s3.Store(store.url, keyless).check()

    s3.Store(store.url, dict(keyless, profile="pgops")).put_bytes("from-profile", b"p")
    with pytest.raises(S3Error, match="cannot set up an S3 client .*nope"):
        s3.Store(store.url, dict(keyless, profile="nope"))

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    s3.Store(store.url, keyless).put_bytes("from-env", b"e")
    assert store.list() == [("from-env", 1), ("from-profile", 1)]


def test_unreachable_endpoint_is_named_quickly():
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = s3.Store("s3://pgops-test/repo", {"endpoint": endpoint, "access_key": "AK", "secret_key": "SK"})
    t0 = time.monotonic()
    with pytest.raises(S3Error, match=f"cannot reach the S3 endpoint {endpoint}"):
        store.check()
    assert time.monotonic() - t0 < 20


def test_tls_failure_mentions_the_ca_bundle(s3_server):
    endpoint = s3_server.endpoint.replace("http://", "https://")
    store = s3.Store("s3://pgops-test/repo", s3_server.store_config(endpoint=endpoint))
    with pytest.raises(S3Error) as err:
        store.check()
    assert f"TLS with the S3 endpoint {endpoint} failed" in str(err.value) and "s3_ca_bundle" in str(err.value)


def test_server_killed_mid_upload_then_the_next_run_succeeds():
    """A server that dies under a multipart upload fails it within the client's timeouts;
    restarted, abort_uploads() clears what was left and a new upload succeeds."""
    t_start = time.monotonic()
    server = SeaweedS3()
    server.start()
    try:
        server.create_bucket("pgops-kill")
        store = s3.Store("s3://pgops-kill/repo", server.store_config())
        writer = store.open_write("20261201T101500Z/base.tar", part_size=5 * MiB, concurrency=2)
        writer.write(pattern(12 * MiB))
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(S3Error) as err:
            for _ in range(12):
                writer.write(pattern(MiB, seed=1))
            writer.close()
        assert time.monotonic() - t0 < 30
        assert f"cannot reach the S3 endpoint {server.endpoint}" in str(err.value)
        assert writer.closed and writer.abort_error  # it tried to abort, the server was gone
        with pytest.raises(S3Error, match="after a failed upload"):
            writer.close()

        server.start()
        assert [u["key"] for u in store.multipart_uploads()] == ["20261201T101500Z/base.tar"]
        assert store.abort_uploads() == 1
        assert store.multipart_uploads() == []
        assert not store.exists("20261201T101500Z/base.tar")

        data = pattern(12 * MiB + 1, seed=2)
        with store.open_write("20261201T101500Z/base.tar", part_size=5 * MiB) as writer:
            write_uneven(writer, data)
        assert sha(store.get_bytes("20261201T101500Z/base.tar")) == sha(data)
    finally:
        server.stop(grace=1)
    assert time.monotonic() - t_start < 60


# -- the managed nodes' interpreter: Debian's python3-boto3 (1.26, botocore 1.29)

NODE_SCRIPT = r"""
import hashlib, io, json, os, sys
from ansible_collections.pgops.online_backup.plugins.module_utils import _s3
import botocore
store = _s3.Store(os.environ["URL"], json.loads(os.environ["CONFIG"]))
store.check()
out = {"botocore": botocore.__version__}
out["first"] = store.put_bytes("c/lock", b"one", if_none_match=True)
out["second"] = store.put_bytes("c/lock", b"two", if_none_match=True)
out["kept"] = store.get_bytes("c/lock").decode()
data = hashlib.sha512(b"x").digest() * (11 * 1024 * 1024 // 64 + 3)
with store.open_write("big", part_size=5 * _s3.MiB) as w:
    for i in range(0, len(data), 1000003):
        w.write(data[i:i + 1000003])
buf = io.BytesIO()
store.download("big", buf, parallel=3, chunk=4 * _s3.MiB)
out["multipart"] = w.upload_id is not None and buf.getvalue() == data
out["uploads"] = store.multipart_uploads()
out["dirs"] = store.list_dirs()
print(json.dumps(out))
"""


def run_on_node_python(url: str, config: dict) -> dict:
    probe = subprocess.run([NODE_PYTHON, "-c", "import boto3"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{NODE_PYTHON} has no boto3 (apt-get install python3-boto3)")
    env = dict(os.environ, PYTHONPATH=collections_workspace(), URL=url, CONFIG=json.dumps(config))
    r = subprocess.run([NODE_PYTHON, "-c", NODE_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["first"] is True and out["second"] is False and out["kept"] == "one", out
    assert out["multipart"] is True and out["uploads"] == [] and out["dirs"] == ["c"], out
    return out


def test_debians_boto3_on_managed_nodes(store, s3_server):
    """Old botocore: If-None-Match as a header, CRC32 part checksums, all over http."""
    run_on_node_python(store.url, s3_server.store_config())


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_https_with_a_ca_bundle():
    """https with a CA of our own through s3_ca_bundle, with both botocores (botocore 1.29 put
    its checksums in aws-chunked trailers there, which SeaweedFS refused), and the message
    when the CA is not given."""
    server = SeaweedS3(tls=True)
    server.start()
    try:
        server.create_bucket("pgops-tls")
        url = "s3://pgops-tls/repo"
        store = s3.Store(url, server.store_config())
        assert store.endpoint.startswith("https://")
        store.check()
        data = pattern(11 * MiB + 3, seed=5)
        with store.open_write("big", part_size=5 * MiB) as writer:
            write_uneven(writer, data)
        assert writer.upload_id is not None and sha(store.get_bytes("big")) == sha(data)
        assert store.put_bytes("small", b"x", if_none_match=True) and not store.put_bytes("small", b"y", if_none_match=True)

        unverified = s3.Store(url, server.store_config(ca_bundle=None))
        with pytest.raises(S3Error) as err:
            unverified.check()
        assert f"TLS with the S3 endpoint {server.endpoint} failed" in str(err.value) and "s3_ca_bundle" in str(err.value)
        insecure = s3.Store(url, server.store_config(ca_bundle=None, verify_tls=False))
        assert insecure.get_bytes("small") == b"x"

        run_on_node_python("s3://pgops-tls/node", server.store_config())
    finally:
        server.stop(grace=1)
