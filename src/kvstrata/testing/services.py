"""Start and stop REAL local Redis and SeaweedFS-S3 servers for tests and benchmarks.

Stdlib only at import time (``boto3`` is imported lazily, only to probe S3 readiness).

Contracts:
* Every server listens on 127.0.0.1 only, on ports picked free at start (all of weed's
  listeners included), so several instances in different state dirs never collide.
* Each server leads its own process group (``start_new_session=True``); ``stop()``/``kill()``
  signal that group only, never anything this module did not start.
* stdout/stderr go to ``<state_dir>/{redis,seaweedfs}.log`` (append mode: restarts add to it).
* Servers started in-process are stopped at interpreter exit (atexit) unless ``detach()``-ed.
* ``start_all`` writes ``<state_dir>/services.json``: urls, credentials, pids (``Services``).

CLI::

    python -m kvstrata.testing.services start --state-dir DIR  # starts both detached, prints json
    python -m kvstrata.testing.services env   --state-dir DIR  # prints `export KVSTRATA_TEST_...`
    python -m kvstrata.testing.services stop  --state-dir DIR  # stops exactly the recorded pids
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

ACCESS_KEY = "kvstrata-test"
SECRET_KEY = "kvstrata-test-secret"
BUCKET = "kvstrata-test"
REGION = "us-east-1"
STOP_TIMEOUT = 10.0
_LIVE: set[_Server] = set()  # in-process servers that atexit stops


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (all held open while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _find_binary(name: str, *fallbacks: str) -> str:
    """``name`` next to sys.executable (the venv's bin), else on PATH, else a fallback path."""
    for cand in (Path(sys.executable).parent / name, shutil.which(name), *fallbacks):
        if cand and os.access(cand, os.X_OK):
            return str(cand)
    raise FileNotFoundError(f"{name!r} not found next to {sys.executable} nor on PATH")


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(pid: int, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
    """Send ``sig`` to the group led by ``pid``; wait ``timeout`` s for it to exit, then SIGKILL."""
    for s, wait in ((sig, timeout), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pid, s) if os.getpgid(pid) == pid else os.kill(pid, s)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _pid_alive(pid):
            return


class _Server:
    """One server process; subclasses define ``name``, ``_argv()`` and ``_probe()``."""

    name = "server"
    ready_timeout = 20.0

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.state_dir / f"{self.name}.log"
        self.ready_seconds: float | None = None  # spawn -> ready, for the last start()
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> _Server:
        """Spawn, block until ``_probe()`` succeeds; on failure kill it and raise RuntimeError."""
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
            )
        _LIVE.add(self)
        error: BaseException | None = None
        while time.monotonic() - t0 < self.ready_timeout and self.is_running():
            try:
                if self._probe():
                    self.ready_seconds = time.monotonic() - t0
                    return self
            except ImportError:
                self.kill()
                raise
            except Exception as exc:  # refused, 5xx while the server warms up, ...
                error = exc
            time.sleep(0.05)
        self.kill()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"{self.name} not ready (exit code {self._proc.returncode}, "
            f"last error {error!r}); log tail:\n{tail}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM our process group, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL our process group (fault injection): the server is gone when this returns."""
        self._end(signal.SIGKILL, STOP_TIMEOUT)

    def restart(self) -> _Server:
        """Stop if running, then start again on the same port(s)."""
        self.stop()
        return self.start()

    def detach(self) -> None:
        """Leave the server running after this interpreter exits (no atexit stop)."""
        _LIVE.discard(self)

    def _end(self, sig: int, timeout: float) -> None:
        _LIVE.discard(self)
        if self.is_running():
            _terminate(self._proc.pid, sig, timeout)
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove what a dead server may leave behind."""


class RedisServer(_Server):
    """``redis-server`` on 127.0.0.1:``port`` without persistence: a restart comes back EMPTY."""

    name = "redis"

    def __init__(self, state_dir: str | os.PathLike, port: int | None = None) -> None:
        super().__init__(state_dir)
        self.port = port or free_ports()[0]
        self.binary = _find_binary("redis-server", "/usr/bin/redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.state_dir),
        ]

    def _probe(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")  # inline command: no client library needed
            return s.recv(64).startswith(b"+PONG")


class RedisClusterNode(RedisServer):
    """One ``redis-server --cluster-enabled yes`` node; its ``nodes.conf`` lives in its own dir,
    so a killed node restarted on the same port rejoins the cluster with its old identity."""

    def __init__(
        self,
        state_dir: str | os.PathLike,
        port: int,
        bus_port: int,
        node_timeout_ms: int,
        binary: str | None = None,
    ) -> None:
        super().__init__(Path(state_dir) / f"node-{port}", port)
        self.binary = binary or self.binary
        self.name = f"redis-{port}"
        self.log_path = self.state_dir / f"{self.name}.log"
        self.bus_port, self.node_timeout_ms = bus_port, node_timeout_ms

    def _argv(self) -> list[str]:
        return [
            *super()._argv(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            str(self.bus_port),  # explicit: port + 10000 may be taken
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # the surviving masters keep serving their slots while one is down
            "--cluster-require-full-coverage",
            "no",
            "--cluster-allow-reads-when-down",
            "no",
            # a replica syncs at once (default: 5 s later); one that never synced cannot fail over
            "--repl-diskless-sync-delay",
            "0",
        ]


class RedisCluster:
    """A real Redis Cluster on 127.0.0.1: ``masters`` masters with ``replicas`` replicas each.

    Built with the Debian ``redis-server`` and ``redis-cli --cluster create``; ready when
    every node reports ``cluster_state:ok`` and all 16384 slots are assigned. Each node is a
    :class:`RedisClusterNode` (own process group, stopped by pid). ``url`` is the
    ``redis+cluster://`` seed kvstrata's redis tier takes. ``node_timeout_ms`` is Redis's
    ``cluster-node-timeout``: a killed master's replica is promoted about 2-3 timeouts later.
    ``server``/``cli`` name other binaries of the same protocol (``valkey-server``/``valkey-cli``).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        server: str = "redis-server",
        cli: str = "redis-cli",
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.masters, self.replicas = masters, replicas
        n = masters * (1 + replicas)
        ports = free_ports(2 * n)
        binary = _find_binary(server, f"/usr/bin/{server}")  # e.g. valkey-server, valkey-cli
        self.nodes = [
            RedisClusterNode(self.state_dir, p, b, node_timeout_ms, binary)
            for p, b in zip(ports[:n], ports[n:], strict=True)
        ]
        self.cli = _find_binary(cli, f"/usr/bin/{cli}")
        self.ready_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisCluster:
        t0 = time.monotonic()
        try:
            for node in self.nodes:
                node.start()
            done = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.ports),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{done.stdout[-2000:]}{done.stderr}"
                )
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - t0
        return self

    def command(self, port: int, *args: str, timeout: float = 5.0) -> str:
        """One ``redis-cli`` command against one node; its output (text)."""
        done = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return done.stdout

    def info(self, port: int, section: str = "cluster") -> dict[str, str]:
        args = ("cluster", "info") if section == "cluster" else ("info", section)
        out = self.command(port, *args)
        return dict(
            line.split(":", 1)
            for line in out.splitlines()
            if ":" in line and not line.startswith("#")
        )

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Block until every running node sees ``cluster_state:ok`` with every slot served,
        as many masters as the cluster was built with, and every replica in sync."""
        deadline = time.monotonic() + timeout
        while True:
            live = [n for n in self.nodes if n.is_running()]
            infos = [self.info(n.port) for n in live]
            repl = [self.info(n.port, "replication") for n in live]
            if (
                infos
                and all(
                    i.get("cluster_state") == "ok"
                    and i.get("cluster_slots_ok") == "16384"
                    and i.get("cluster_size") == str(self.masters)
                    for i in infos
                )
                and all(
                    r.get("role") == "master" or r.get("master_link_status") == "up" for r in repl
                )
                and len(self.master_ports()) == self.masters
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster not ok after {timeout} s: {infos}")
            time.sleep(0.1)

    def master_ports(self) -> list[int]:
        """Ports of the running nodes that are masters with slots, from a live node's view."""
        live = [n for n in self.nodes if n.is_running()]
        if not live:
            return []
        masters = []
        for line in self.command(live[0].port, "cluster", "nodes").splitlines():
            parts = line.split()
            if len(parts) >= 9 and "master" in parts[2] and "fail" not in parts[2]:
                masters.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(p for p in masters if any(n.port == p and n.is_running() for n in self.nodes))

    def node(self, port: int) -> RedisClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def kill_master(self, port: int | None = None) -> RedisClusterNode:
        """SIGKILL one master (the first by port unless told): its slots are down until failover."""
        victim = self.node(port if port is not None else self.master_ports()[0])
        victim.kill()
        return victim

    def wait_failover(self, timeout: float = 30.0) -> None:
        """Block until the surviving nodes serve every slot again (a replica took over)."""
        self.wait_ok(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def detach(self) -> None:
        for node in self.nodes:
            node.detach()


def start_redis_cluster(
    state_dir: str | os.PathLike,
    masters: int = 3,
    replicas: int = 1,
    node_timeout_ms: int = 1000,
    **binaries: str,
) -> RedisCluster:
    """Start a Redis Cluster on free ports (files in ``state_dir``); return once it is ok.
    ``server=``/``cli=`` pick other binaries (Valkey's)."""
    return RedisCluster(state_dir, masters, replicas, node_timeout_ms, **binaries).start()


def s3_client(endpoint: str, access_key: str, secret_key: str):
    """A boto3 S3 client for readiness probes: path addressing, short timeouts, one attempt."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            connect_timeout=1,
            read_timeout=5,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


def s3_ready(client, bucket: str) -> bool:
    """Create ``bucket`` if absent, then a signed PUT and GET of a small object succeed."""
    key = ".kvstrata-ready"
    if not any(b["Name"] == bucket for b in client.list_buckets().get("Buckets", [])):
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=key, Body=b"ok")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"ok"


# Every listener `weed mini` opens gets an explicit port; Iceberg, Lance and WebDAV are off.
_WEED_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
)


class S3Server(_Server):
    """SeaweedFS ``weed mini`` with its S3 gateway at ``endpoint`` and one identity.

    Ready means ``bucket`` exists and a signed PUT then GET of a small object succeeded.
    Data lives in ``<state_dir>/seaweedfs-data``, so it survives ``kill()`` + ``restart()``.
    """

    name = "seaweedfs"
    ready_timeout = 60.0

    def __init__(
        self,
        state_dir: str | os.PathLike,
        bucket: str = BUCKET,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
    ) -> None:
        super().__init__(state_dir)
        self.bucket, self.access_key, self.secret_key = bucket, access_key, secret_key
        self.ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS)), strict=True))
        self.binary = _find_binary("weed")
        self._client = None

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    url = endpoint

    def _argv(self) -> list[str]:
        ident = {
            "name": "test",
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
        }
        config = self.state_dir / "s3.json"
        config.write_text(json.dumps({"identities": [ident]}))
        data = self.state_dir / "seaweedfs-data"
        data.mkdir(exist_ok=True)
        argv = [
            self.binary,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # stop in ~1 s instead of ~2 s
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        for svc in ("s3", "filer"):  # else /tmp/seaweedfs-<svc>-<port>.sock
            if len(str(self.state_dir / f"{svc}.sock")) < 100:  # sun_path limit
                argv.append(f"-{svc}.localSocket={self.state_dir / f'{svc}.sock'}")
        return argv

    def _probe(self) -> bool:
        if self._client is None:
            self._client = s3_client(self.endpoint, self.access_key, self.secret_key)
        return s3_ready(self._client, self.bucket)

    def _cleanup(self) -> None:
        # A killed weed leaves its unix sockets behind; those named after our ports are ours.
        ours = {str(p) for p in self.ports.values()}
        for path in [*Path("/tmp").glob("seaweedfs-*.sock"), *self.state_dir.glob("*.sock")]:
            if path.parent == self.state_dir or path.stem.rsplit("-", 1)[-1] in ours:
                path.unlink(missing_ok=True)


class RGWServer:
    """A single-node Ceph RGW (S3) started by the project's ``scripts/rgw.sh`` (one mon, one
    memstore OSD, radosgw/beast on 127.0.0.1; Debian packages installed if missing).

    Same attributes as :class:`S3Server` (``endpoint``, ``bucket``, keys), so tests and
    benchmarks take either. Ready means the script's gateway answered and ``bucket`` exists
    after a signed PUT then GET. ``ready_seconds`` includes the bucket probe; ``stop()`` kills
    exactly the pids the script recorded. Data is in RAM: a stop loses it.
    """

    name = "rgw"

    def __init__(
        self,
        state_dir: str | os.PathLike,
        bucket: str = BUCKET,
        script: str | os.PathLike | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.bucket = bucket
        self.script = Path(
            script
            or os.environ.get("KVSTRATA_RGW_SCRIPT")
            or Path(__file__).resolve().parents[3] / "scripts" / "rgw.sh"
        )
        self.endpoint = ""
        self.access_key = self.secret_key = ""
        self.pids: list[int] = []
        self.ready_seconds: float | None = None

    url = property(lambda self: self.endpoint)

    def start(self, timeout: float = 300.0) -> RGWServer:
        t0 = time.monotonic()
        done = subprocess.run(
            ["bash", str(self.script), "start", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{self.script} start failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        info = json.loads(done.stdout.strip().splitlines()[-1])
        self.endpoint, self.pids = info["endpoint"], info["pids"]
        self.access_key, self.secret_key = info["access_key"], info["secret_key"]
        _LIVE_RGW.add(self)
        client = s3_client(self.endpoint, self.access_key, self.secret_key)
        deadline, error = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                if s3_ready(client, self.bucket):
                    self.ready_seconds = time.monotonic() - t0
                    return self
            except Exception as exc:  # the gateway may answer before its pools are writable
                error = exc
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"rgw not ready: {error!r}")

    def stop(self) -> None:
        _LIVE_RGW.discard(self)
        subprocess.run(
            ["bash", str(self.script), "stop", str(self.state_dir)],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )


_LIVE_RGW: set[RGWServer] = set()


def start_rgw(state_dir: str | os.PathLike, bucket: str = BUCKET) -> RGWServer:
    """Start a Ceph RGW with ``scripts/rgw.sh`` (files
    in ``state_dir``); return once ``bucket`` works."""
    return RGWServer(state_dir, bucket).start()


@dataclass
class Services:
    """What ``start_all`` started: how to reach Redis and S3, plus the server pids."""

    redis_url: str
    s3_endpoint: str
    s3_bucket: str = BUCKET
    s3_access_key: str = ACCESS_KEY
    s3_secret_key: str = SECRET_KEY
    s3_region: str = REGION
    redis_pid: int | None = None
    s3_pid: int | None = None
    ready_seconds: dict[str, float] = field(default_factory=dict)
    redis: RedisServer | None = field(default=None, repr=False, compare=False)
    s3: S3Server | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The JSON-able fields (the content of ``services.json``); server objects left out."""
        skip = ("redis", "s3")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def env(self) -> dict[str, str]:
        """``KVSTRATA_TEST_`` + REDIS_URL, S3_{ENDPOINT,BUCKET,ACCESS_KEY,SECRET_KEY,REGION}."""
        return {
            f"KVSTRATA_TEST_{k.upper()}": v for k, v in self.to_dict().items() if isinstance(v, str)
        }

    @classmethod
    def load(cls, state_dir: str | os.PathLike) -> Services:
        """Read ``<state_dir>/services.json``; no server objects (stop: ``stop_all(dir)``)."""
        data = json.loads((Path(state_dir) / "services.json").read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def start_redis(state_dir: str | os.PathLike) -> RedisServer:
    """Start Redis on a free port (files in ``state_dir``); return once it answers PING."""
    return RedisServer(state_dir).start()


def start_seaweedfs(state_dir: str | os.PathLike, bucket: str = BUCKET) -> S3Server:
    """Start SeaweedFS on free ports; return once ``bucket`` exists and PUT+GET work."""
    return S3Server(state_dir, bucket=bucket).start()


def start_all(state_dir: str | os.PathLike) -> Services:
    """Start Redis and SeaweedFS, write ``<state_dir>/services.json``, return ``Services``."""
    redis = start_redis(state_dir)
    try:
        s3 = start_seaweedfs(state_dir)
    except BaseException:
        redis.stop()
        raise
    svc = Services(
        redis_url=redis.url,
        s3_endpoint=s3.endpoint,
        s3_bucket=s3.bucket,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        redis_pid=redis.pid,
        s3_pid=s3.pid,
        redis=redis,
        s3=s3,
        ready_seconds={"redis": redis.ready_seconds, "seaweedfs": s3.ready_seconds},
    )
    (Path(state_dir) / "services.json").write_text(json.dumps(svc.to_dict(), indent=2) + "\n")
    return svc


def stop_all(target: Services | str | os.PathLike) -> None:
    """Stop the servers of a ``Services`` from ``start_all``, or those recorded in a state dir.

    Pids from ``services.json`` are signalled only while ``/proc/<pid>/cmdline`` still names
    ``redis-server`` / ``weed``, so a recycled pid is left alone.
    """
    if isinstance(target, Services) and (target.redis or target.s3):
        for server in (target.s3, target.redis):
            if server:
                server.stop()
        return
    svc = target if isinstance(target, Services) else Services.load(target)
    for pid, binary in ((svc.s3_pid, "weed"), (svc.redis_pid, "redis-server")):
        try:  # redis-server rewrites its argv[0] to "/usr/bin/redis-server 127.0.0.1:PORT"
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue  # gone already
        if pid and argv0 and os.path.basename(argv0.split()[0]) == binary:
            _terminate(pid)
    if not isinstance(target, Services):
        for sock in Path(target).glob("*.sock"):  # weed leaves its s3 socket even on SIGTERM
            sock.unlink(missing_ok=True)


@atexit.register
def _stop_live() -> None:
    for server in [*_LIVE, *_LIVE_RGW]:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvstrata.testing.services",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("command", choices=["start", "stop", "env"])
    ap.add_argument("--state-dir", required=True)
    args = ap.parse_args(argv)
    if args.command == "start":
        svc = start_all(args.state_dir)
        svc.redis.detach()
        svc.s3.detach()
        print(json.dumps(svc.to_dict(), indent=2))
    elif args.command == "stop":
        stop_all(args.state_dir)
    else:
        env = Services.load(args.state_dir).env()
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
