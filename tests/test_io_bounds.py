"""Every tier call bounded and isolated: special files in the disk tier's directory, a stuck
tier's pool, a lookup's wait for in-flight saves, kvstrata's loop never stalled by a tier
call, and a NIXL tier closed while its endpoint is down. What each test proves is written in
docs/reliability.md ("I/O bounds")."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from kvstrata.tiers.base import Hit, Miss
from tests.conftest import make_keys, make_object

SPECIALS = ["fifo", "directory", "symlink", "device"]


def plant(path: Path, kind: str, target: Path | None = None) -> None:
    """A real special file of ``kind`` under ``path`` (the name a chunk's file would have)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif kind == "symlink":  # to a valid object: following it would serve bytes nobody put here
        os.symlink(target, path)
    elif kind == "device":  # /dev/zero's numbers: endless zeros if it were read
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    else:
        raise ValueError(kind)


def exists(path: Path) -> bool:
    return os.path.lexists(path)


@pytest.mark.parametrize("kind", SPECIALS)
async def test_disk_special_file_is_a_miss_for_its_object_only(
    make_tier, tmp_path, kind: str
) -> None:
    """A FIFO, directory, symlink or device under a chunk's name: that chunk is a corrupt miss
    (whole and layer gets, at once -- a FIFO's open never blocks), its neighbours in the batch
    are hits, it is never indexed, a delete removes the name (a directory stays), and a put
    afterwards stores the real object."""
    root = tmp_path / "kv"
    a, victim, b = make_keys(3)
    blobs = {k: make_object(k)[0] for k in (a, victim, b)}
    tier = make_tier("disk", path=root)
    await tier.put([(a, blobs[a]), (b, blobs[b])])
    elsewhere = tmp_path / "valid-object"
    elsewhere.write_bytes(blobs[victim])
    name = Path(tier._file(victim))
    plant(name, kind, target=elsewhere)

    fresh = make_tier("disk", path=root)  # re-indexes the directory, special file included
    assert await fresh.contains([a, victim, b]) == [True, False, True]
    for reader in (tier, fresh):
        for layers in (None, range(1, 3)):
            got = await asyncio.wait_for(reader.get([a, victim, b], layers), timeout=5)
            assert isinstance(got[0], Hit) and isinstance(got[2], Hit)
            assert isinstance(got[1], Miss) and got[1].reason == "corrupt", got[1]
            assert {
                "fifo": "FIFO",
                "directory": "directory",
                "symlink": "symlink",
                "device": "character device",
            }[kind] in got[1].detail

    await fresh.delete([victim])  # what the orchestrator does with a corrupt object
    assert exists(name) == (kind == "directory")
    result = await tier.put([(a, blobs[a]), (victim, blobs[victim]), (b, blobs[b])])
    assert result.stored == (2 if kind == "directory" else 3)
    (got,) = await tier.get([victim])
    assert isinstance(got, Hit) == (kind != "directory")


async def test_disk_put_skips_only_the_objects_whose_names_are_taken(make_tier, tmp_path) -> None:
    """A directory under one chunk's name and a file where another chunk's fan-out directory
    belongs: those two are not stored, the rest of the batch is."""
    root = tmp_path / "kv"
    tier = make_tier("disk", path=root)
    keys = make_keys(6)
    blocked_dir, blocked_parent = (
        keys[0],
        next(k for k in keys[1:] if str(k)[:2] != str(keys[0])[:2]),
    )
    plant(Path(tier._file(blocked_dir)), "directory")
    fanout = root / str(blocked_parent)[:2]
    fanout.parent.mkdir(parents=True, exist_ok=True)
    fanout.write_bytes(b"not a directory")
    others = [
        k
        for k in keys
        if k not in (blocked_dir, blocked_parent) and str(k)[:2] != str(blocked_parent)[:2]
    ]
    result = await tier.put(
        [(k, make_object(k)[0]) for k in [blocked_dir, blocked_parent, *others]]
    )
    assert result.stored == len(others)
    assert await tier.contains([blocked_dir, blocked_parent, *others]) == [False, False] + [
        True
    ] * len(others)


async def test_disk_file_larger_than_the_tier_is_a_miss_not_a_read(make_tier, tmp_path) -> None:
    """A (sparse) file bigger than the tier's capacity cannot be one of its objects: a miss,
    without reading its bytes into memory."""
    tier = make_tier("disk", path=tmp_path / "kv", capacity_bytes=1 << 20)
    (key,) = make_keys(1)
    name = Path(tier._file(key))
    name.parent.mkdir(parents=True)
    with open(name, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB, sparse: reading it would take the memory
    (got,) = await asyncio.wait_for(tier.get([key]), timeout=5)
    assert (
        isinstance(got, Miss) and got.reason == "corrupt" and "larger than the tier" in got.detail
    )


def test_fifos_in_the_disk_directory_stall_nothing_and_the_process_exits(
    redis_server, tmp_path
) -> None:
    """A process with dram + disk + redis and 20 FIFOs planted under chunk names
    (tests/io_child.py): reading them answers at once (corrupt misses), saves land in memory and
    Redis at their normal rate (best of 3 rounds against the best of 3 before, a shared machine
    varies 5x round to round), the same with every disk thread stuck for good (simulated), and
    the process exits promptly although those threads never return."""
    import json

    lines, exit_s, rc = _run_child("tests.io_child", redis_server.url, str(tmp_path / "disk"))
    out = json.loads(lines[-2])
    close_s = json.loads(lines[-1])["close_s"]
    print(
        json.dumps({**out, "close_s": close_s, "exit_s": round(exit_s, 3)})
    )  # the numbers, for the docs
    assert out["fifo_get"]["answered"] and out["fifo_get"]["reasons"] == ["corrupt"]
    assert out["fifo_get"]["seconds"] < 2
    before = out["before"]["best_chunks_per_s"]
    for phase in ("after_fifos", "stuck_disk"):
        assert out[phase]["landed"], phase
        assert out[phase]["best_chunks_per_s"] >= 0.3 * before, (phase, out)
    assert out["stuck_threads"] >= 4  # the disk pool's threads really were stuck at exit
    assert close_s < 10 and exit_s < 10
    assert rc == 0


# -- an orchestrator over real servers, some behind the throttling proxy --------------------

CHUNK = 32


def _model():
    from kvstrata.model import ModelSpec

    return ModelSpec("io-bounds-model", n_layers=4, kv_heads=2, head_dim=16, dtype="float32")


def _kv(seed: int):
    import numpy as np

    m = _model()
    return np.random.default_rng(seed).standard_normal(
        (m.n_layers, 2, CHUNK, m.kv_heads, m.head_dim), dtype=np.float32
    )


def _tokens(seed: int, n_chunks: int = 1):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 30000, size=n_chunks * CHUNK + 1)


@pytest.fixture
def orchestrator():
    """Build orchestrators from a ``tiers:`` and ``policy:`` YAML body; closed after the test."""
    import textwrap

    from kvstrata.config import parse_config
    from kvstrata.orchestrator import Orchestrator

    made = []

    def build(tiers: str, policy: str):
        text = (
            f"version: 1\nchunk_tokens: {CHUNK}\nengine: {{prefill_tokens_per_s: 1.0}}\n"
            "orchestrator: {save_queue_chunks: 256, breaker: {failures: 3, cooldown_s: 1.0}}\n"
            "tiers:\n"
            + textwrap.indent(textwrap.dedent(tiers), "  ")
            + "policy:\n"
            + textwrap.indent(textwrap.dedent(policy), "  ")
        )
        orch = Orchestrator(parse_config(text), _model())
        made.append(orch)
        return orch

    yield build
    for orch in made:
        orch.close(timeout=30)


def test_lookup_waits_for_inflight_saves_only_within_its_budget(redis_server, orchestrator) -> None:
    """A chunk being written to a slow Redis (the real server behind the throttling proxy,
    ~2.5 s per put): a lookup of the same prompt with a 200 ms budget returns within its
    budget (not the ~2 s the put still needs); with a 5 s budget it waits, and finds the chunk."""
    from kvstrata.policy.route import RequestContext
    from kvstrata.testing.throttle import ThrottledProxy

    host, port = redis_server.url.split("//")[1].split("/")[0].split(":")
    proxy = ThrottledProxy(host, int(port), bytes_per_s=16_000)
    try:
        orch = orchestrator(
            f"""\
            dram: {{kind: memory, capacity_bytes: 64MiB, timeout_ms: 10000}}
            slow: {{kind: redis, url: "redis://127.0.0.1:{proxy.port}/0",
                    key_prefix: "io-{time.time_ns()}:", timeout_ms: 20000, timeout_s: 20}}
            """,
            "default: {read: [dram], write: [dram, slow], load: always}\n",
        )
        for seed, budget_ms, waits in ((1, 200, False), (2, 5000, True)):
            tokens = _tokens(seed)
            first = orch.lookup(tokens, RequestContext())
            assert orch.save(first, 0, _kv(seed))
            time.sleep(0.05)  # the dram put is done; the slow put is on the wire
            started = time.monotonic()
            plan = orch.lookup(tokens, RequestContext(budget_ms=budget_ms))
            took = time.monotonic() - started
            print(f"lookup with a {budget_ms} ms budget, its chunk in flight: {took * 1e3:.0f} ms")
            if waits:  # the save finished within the wait: the chunk is found in dram
                assert 0.5 < took < 5.0 and [c.tier for c in plan.chunks] == ["dram"], (
                    took,
                    plan.reason,
                )
            else:
                assert took < budget_ms / 1e3 + 0.15, (
                    f"lookup took {took:.3f} s on a {budget_ms} ms budget"
                )
            assert orch.flush(30)
    finally:
        proxy.close()


def _run_child(
    module: str, *args: str, limit_s: float = 180, exit_s: float = 15
) -> tuple[list[str], float, int]:
    """Run ``python -m module args``: its stdout lines up to ``exiting``, how long it took to
    exit after that, and its return code. Fails the test if it never gets there, or hangs there."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")]
        ),
    }
    child = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines, exiting_at = [], None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and (line := child.stdout.readline()):
            if line.strip() == "exiting":
                exiting_at = time.monotonic()
                break
            lines.append(line)
        assert exiting_at is not None, (
            f"{module} never finished its work (rc={child.poll()}): {lines}"
        )
        child.wait(timeout=exit_s)  # raises TimeoutExpired if exit waits on a stuck thread
        return lines, time.monotonic() - exiting_at, child.returncode
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_nixl_tier_closed_with_its_endpoint_down_stalls_nothing(tmp_path) -> None:
    """A NIXL tier's SeaweedFS killed while it reads and writes, the tier closed (in a child
    process, tests/nixl_child.py: a NIXL fault must not take the test session down): close
    returns at once, the agent is freed by its release thread within seconds of its last
    transfer ending and collected, and no thread of the process is ever held up more than
    1 s (it was 19-22 s: the plugin's destructor joining an SDK thread that retried for ~25 s,
    with the GIL held). The process exits normally."""
    import json

    lines, exit_s, rc = _run_child("tests.nixl_child", str(tmp_path / "s3"))
    out = json.loads(lines[-1])
    print(json.dumps({**out, "exit_s": round(exit_s, 3)}))
    assert out["close_s"] < 0.5
    assert out["release"] == "freed" and out["release_s"] < 15
    assert not out["agent_alive"]
    assert out["max_late_s"] < 1.0 and out["samples"] > 100, out
    assert max(out["ops_s"].values()) < 5  # failures are fast, the SDK no longer retries for 25 s
    assert rc == 0 and exit_s < 15


# -- kvstrata's loop during every tier call -------------------------------------------------

LOOP_STALL_S = 0.1  # the bound: no tier call may hold kvstrata's loop longer
PROCESS_STALL_S = 1.0  # every thread late this long: a GIL held process-wide (or no CPU at all)


class LoopProbe:
    """Stalls of kvstrata's background loop (:mod:`kvstrata.runtime`) while a block runs.

    Like conftest's LoopWatchdog, a no-op is posted to the loop over and over (every 10 ms
    here) and its latency recorded; and a reference thread records how late it wakes. The
    machine is shared (2 cores, several test suites), so a late no-op alone does not convict
    the loop: a sample is a *loop stall* when the loop thread itself burned more than
    ``LOOP_STALL_S`` of CPU in that window (it ran something long, GIL or not), or when the
    no-op was late by more than ``LOOP_STALL_S`` beyond both the reference thread's lateness
    (the whole process held up) and the time the loop thread spent runnable but waiting for a
    CPU (its run-queue wait, from /proc: the kernel's doing, not ours) while the loop used
    almost no CPU (under 10% of that time) -- that is, the loop was blocked (a syscall, a
    lock). A loop that ran Python with more CPU than that and still took long was waiting
    for the GIL between steps: other threads' doing, which this probe cannot tell apart
    from a blocking call otherwise. A window where the reference thread was late by more than
    ``PROCESS_STALL_S``, its own run-queue wait not counted, is a *process stall*: a GIL held
    that long (the NIXL destructor's kind)."""

    def __init__(self, period_s: float = 0.01):
        from kvstrata import runtime

        self.loop = runtime.loop()
        thread = next(t for t in threading.enumerate() if t.name == "kvstrata-loop")
        self.cpu_clock = time.pthread_getcpuclockid(thread.ident)
        self.loop_thread = thread.ident
        self.schedstat = f"/proc/self/task/{thread.native_id}/schedstat"
        self.stacks: dict[float, str] = {}  # posted -> the loop thread's stack, for slow samples
        self.period_s = period_s
        self.samples: list[
            tuple[float, float, float, float]
        ] = []  # (posted, latency, loop cpu s, run-queue s)
        self.late: list[tuple[float, float]] = []  # (woke, lateness) of the reference thread
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=f, daemon=True) for f in (self._probe, self._reference)
        ]

    def __enter__(self) -> LoopProbe:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        ended = (
            time.monotonic()
        )  # one more sample posted after the block: a stall at its end counts
        while not any(sample[0] > ended for sample in self.samples) and self._threads[0].is_alive():
            time.sleep(self.period_s)
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _probe(self) -> None:
        while not self._stop.is_set():
            done, ran = threading.Event(), []

            # stamps the time on the loop itself: this thread may wake late. ran and done are
            # bound as defaults: each noop writes to its own probe's list and event
            def noop(ran: list = ran, done: threading.Event = done) -> None:
                ran.append((time.monotonic(), time.clock_gettime(self.cpu_clock), self._queued()))
                done.set()

            queued0, cpu0, posted = (
                self._queued(),
                time.clock_gettime(self.cpu_clock),
                time.monotonic(),
            )
            self.loop.call_soon_threadsafe(noop)
            if not done.wait(
                LOOP_STALL_S
            ):  # what the loop is doing instead, for the failure message
                frame = sys._current_frames().get(self.loop_thread)
                self.stacks[posted] = "".join(traceback.format_stack(frame)[-12:]) if frame else "?"
                done.wait()
            at, cpu, queued = ran[0]
            self.samples.append((posted, at - posted, cpu - cpu0, queued - queued0))
            time.sleep(self.period_s)

    def _queued(self, schedstat: str | None = None) -> float:
        """Seconds a thread (the loop's by default) has spent runnable, waiting for a CPU."""
        with open(schedstat or self.schedstat) as f:
            return int(f.read().split()[1]) / 1e9

    def _reference(self) -> None:
        # its own run-queue wait is taken off its lateness: a thread the kernel did not schedule
        # is the machine's doing; one that got a CPU and still could not run waited for the GIL
        own = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        while not self._stop.is_set():
            queued, before = self._queued(own), time.monotonic()
            time.sleep(self.period_s)
            woke = time.monotonic()
            self.late.append(
                (woke, max(woke - before - self.period_s - (self._queued(own) - queued), 0.0))
            )

    def _process_late(self, start: float, end: float) -> float:
        return max(
            (late for woke, late in self.late if start <= woke <= end + self.period_s), default=0.0
        )

    def loop_stalls(self) -> list[dict]:
        out = []
        for posted, latency, cpu, queued in self.samples:
            if latency <= LOOP_STALL_S:
                continue
            process = self._process_late(posted, posted + latency)
            blocked = latency - max(
                process, queued
            )  # neither the machine's nor the whole process's
            # Blocked with (almost) no CPU: a syscall or a lock. Blocked while running Python
            # (CPU > 10% of it): waits for the GIL between steps, other threads' doing.
            if cpu > LOOP_STALL_S or (blocked > LOOP_STALL_S and cpu < 0.1 * blocked):
                out.append(
                    {
                        "latency_s": round(latency, 3),
                        "process_late_s": round(process, 3),
                        "loop_cpu_s": round(cpu, 3),
                        "loop_run_queue_s": round(queued, 3),
                        "loop_stack": self.stacks.get(posted, "?"),
                    }
                )
        return out

    def process_stalls(self) -> list[float]:
        return [round(late, 3) for _, late in self.late if late > PROCESS_STALL_S]

    def check(self, what: str) -> None:
        assert self.samples, f"{what}: the probe took no sample"
        print(
            f"loop probe, {what}: {len(self.samples)} samples, "
            f"max latency {max(s[1] for s in self.samples) * 1e3:.0f} ms, "
            f"max loop CPU per sample {max(s[2] for s in self.samples) * 1e3:.0f} ms, "
            f"max process lateness {max((x for _, x in self.late), default=0) * 1e3:.0f} ms"
        )
        assert not self.loop_stalls(), f"{what}: kvstrata's loop stalled: {self.loop_stalls()}"
        assert not self.process_stalls(), (
            f"{what}: the whole process stalled: {self.process_stalls()}"
        )


def _on_loop(coro, timeout: float = 60):
    from kvstrata import runtime

    return runtime.run(coro, timeout=timeout)


async def _every_op(
    tier, keys, blobs, expect_failure: bool = False, limit_s: float | None = None
) -> dict:
    """put, contains, get, get of layers, delete: each op's outcome ("ok", or the error's type)."""
    from kvstrata.tiers.base import TierError

    outcomes = {}
    ops = (
        ("put", lambda: tier.put(list(zip(keys, blobs, strict=True)))),
        ("contains", lambda: tier.contains(keys)),
        ("get", lambda: tier.get(keys)),
        ("get-layers", lambda: tier.get(keys, range(1, 3))),
        ("delete", lambda: tier.delete(keys)),
    )
    for op, call in ops:
        try:
            await asyncio.wait_for(call(), limit_s)
            outcomes[op] = "ok"
        except (TimeoutError, TierError) as exc:
            outcomes[op] = type(exc).__name__
    if not expect_failure:
        assert set(outcomes.values()) == {"ok"}, outcomes
    return outcomes


def _objects(n: int, section_bytes: int, layers: int = 8):
    keys = make_keys(n)
    return keys, [
        make_object(k, layers, section_bytes=section_bytes, ragged=False, seed=i)[0]
        for i, k in enumerate(keys)
    ]


def _build(kind: str, request, tmp_path, **settings):
    """A tier of ``kind`` over the session's servers (constructed off the loop, used on it)."""
    from kvstrata.tiers.base import create_tier
    from tests.conftest import s3_settings, unique

    if kind == "disk":
        return create_tier("disk", path=tmp_path / f"disk-{unique()}", **settings)
    if kind == "redis":
        return create_tier(
            "redis",
            url=settings.pop("url", None) or request.getfixturevalue("redis_server").url,
            key_prefix=f"io-{unique()}:",
            **settings,
        )
    if kind.startswith("s3-"):
        server = settings.pop("server", None) or request.getfixturevalue("s3_server")
        return create_tier(
            "s3", name=kind, **s3_settings(server, kind[3:], prefix=f"io-{unique()}/", **settings)
        )
    if kind == "lmcache":
        return create_tier("lmcache", capacity_bytes=64 << 20, **settings)
    return create_tier(kind, **settings)


@pytest.mark.parametrize(
    "kind", ["memory", "lmcache", "disk", "redis", "s3-obstore", "s3-aioboto3", "s3-nixl"]
)
def test_no_tier_call_stalls_the_loop(request, tmp_path, kind: str) -> None:
    """Every operation of every tier kind, on kvstrata's own loop, with 16 objects of 1 MiB:
    the loop never stalls more than 100 ms (see LoopProbe), the process never more than 1 s."""
    keys, blobs = _objects(16, 128 << 10)
    tier = _build(kind, request, tmp_path)
    try:
        with LoopProbe() as probe:
            for _ in range(2):  # the first round pays one-off costs (connections, clients)
                _on_loop(_every_op(tier, keys, blobs))
        probe.check(kind)
    finally:
        _on_loop(tier.close())


def test_no_tier_call_stalls_the_loop_with_special_files_in_the_disk_tier(tmp_path) -> None:
    """A FIFO, a directory, a symlink and a device under four of eight chunks' names."""
    from kvstrata.tiers.base import create_tier

    keys, blobs = _objects(8, 128 << 10)
    tier = create_tier("disk", path=tmp_path / "kv")
    _on_loop(tier.put(list(zip(keys[4:], blobs[4:], strict=True))))
    for key, kind in zip(keys, SPECIALS, strict=False):
        plant(Path(tier._file(key)), kind, target=tmp_path)
    with LoopProbe() as probe:
        got = _on_loop(tier.get(keys))
        assert [isinstance(g, Hit) for g in got] == [False] * 4 + [True] * 4
        _on_loop(_every_op(tier, keys, blobs, expect_failure=True))
    probe.check("disk with special files")


def test_no_tier_call_stalls_the_loop_when_servers_die(tmp_path) -> None:
    """Redis and SeaweedFS killed (SIGKILL) under a redis tier and the three S3 transports:
    every operation fails (TierError), and the loop and the process go on."""
    from kvstrata.testing import services as svc

    keys, blobs = _objects(4, 64 << 10)
    redis = svc.start_redis(tmp_path / "redis")
    s3 = svc.start_seaweedfs(tmp_path / "s3")
    tiers = []
    try:
        tiers = [_build("redis", None, tmp_path, url=redis.url, timeout_s=1.0)] + [
            _build(kind, None, tmp_path, server=s3, timeout_s=2.0, max_retries=1)
            for kind in ("s3-obstore", "s3-aioboto3", "s3-nixl")
        ]
        for tier in tiers:
            _on_loop(tier.put(list(zip(keys, blobs, strict=True))))
        redis.kill()
        s3.kill()
        with LoopProbe() as probe:
            for tier in tiers:
                outcomes = _on_loop(_every_op(tier, keys, blobs, expect_failure=True), timeout=120)
                assert "ok" not in {outcomes[op] for op in ("put", "get", "get-layers")}, (
                    tier.name,
                    outcomes,
                )
        probe.check("servers killed")
    finally:
        for tier in tiers:
            _on_loop(tier.close())
        redis.stop()
        s3.stop()


@pytest.mark.parametrize("kind", ["redis", "s3-obstore", "s3-nixl"])
@pytest.mark.parametrize("link", ["slow", "stuck"])
def test_no_tier_call_stalls_the_loop_behind_a_slow_or_stuck_link(
    request, tmp_path, kind: str, link: str
) -> None:
    """The real server behind the throttling proxy: 2 MB/s (slow: calls finish, late) or
    1 B/s (stuck: every call hits its 1.5 s limit). The loop goes on either way."""
    from kvstrata.testing.throttle import ThrottledProxy

    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        host, port = server.url.split("//")[1].split("/")[0].split(":")
    else:
        server = request.getfixturevalue("s3_server")
        host, port = server.endpoint.split("//")[1].split(":")
    proxy = ThrottledProxy(host, int(port), bytes_per_s=2_000_000 if link == "slow" else 1)
    keys, blobs = _objects(4, 16 << 10)
    if kind == "redis":
        tier = _build(
            "redis", None, tmp_path, url=f"redis://127.0.0.1:{proxy.port}/0", timeout_s=30
        )
    else:
        via = _with_endpoint(server, proxy.port)
        tier = _build(kind, None, tmp_path, server=via, timeout_s=30, max_retries=0)
    try:
        with LoopProbe() as probe:
            started = time.monotonic()
            outcomes = _on_loop(
                _every_op(tier, keys, blobs, expect_failure=True, limit_s=1.5), timeout=120
            )
            seconds = time.monotonic() - started
        if link == "slow":
            assert outcomes["put"] == "ok" and outcomes["get"] == "ok", outcomes
        else:
            assert "TimeoutError" in outcomes.values(), outcomes
        assert seconds < 5 * 1.5 + 3  # every call within its limit
        probe.check(f"{kind} behind a {link} link")
    finally:
        proxy.set_rate(0)  # uncapped: what is still queued drains for the close
        _on_loop(tier.close())
        proxy.close()


def _with_endpoint(server, port: int):
    """The S3 server's settings with the proxy as endpoint."""

    class Via:
        endpoint = f"http://127.0.0.1:{port}"
        bucket, access_key, secret_key = server.bucket, server.access_key, server.secret_key

    return Via()


def test_the_probe_sees_a_blocked_a_busy_and_a_gil_holding_loop() -> None:
    """The probe itself can fail: a blocking call on the loop (sleep: a syscall, no CPU), Python
    code spinning on it, and a C call holding the GIL (a sort) are all caught, and a loop that
    only awaits is not."""

    async def blocked():
        time.sleep(0.3)

    async def busy():  # 0.3 s of the loop thread's CPU (not of wall time: the machine is shared)
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    async def gil():
        sorted(range(30_000_000, 0, -1))  # one C call: the GIL is not released until it returns

    async def awaits():
        await asyncio.sleep(0.3)

    for coro, loop_stall, process_stall in (
        (blocked, True, False),
        (busy, True, False),
        (gil, None, True),
        (awaits, False, False),
    ):
        with LoopProbe() as probe:
            time.sleep(0.05)
            _on_loop(coro())
        if loop_stall is not None:
            assert bool(probe.loop_stalls()) == loop_stall, (coro.__name__, probe.loop_stalls())
        if (
            process_stall
        ):  # how long a 30M-item sort holds the GIL depends on the machine: > 1 s here
            assert probe.process_stalls() or probe.loop_stalls(), coro.__name__


@pytest.mark.parametrize("link", ["slow", "stuck"])
def test_a_slow_or_stuck_tier_costs_the_others_nothing(
    redis_server, orchestrator, link: str
) -> None:
    """The orchestrator with dram and a Redis behind the throttling proxy (slow: 2 MB/s; stuck:
    1 B/s) and a 300 ms timeout for it. Saves land in dram at once and flush within a bound
    (stuck: each Redis call ends at its timeout, then its breaker skips it); every lookup
    returns within the Redis timeout plus a margin and finds the dram chunks; slow Redis still
    gets its writes. kvstrata's loop never stalls meanwhile."""
    from kvstrata.policy.route import RequestContext
    from kvstrata.testing.throttle import ThrottledProxy

    host, port = redis_server.url.split("//")[1].split("/")[0].split(":")
    proxy = ThrottledProxy(host, int(port), bytes_per_s=2_000_000 if link == "slow" else 1)
    try:
        orch = orchestrator(
            f"""\
            dram: {{kind: memory, capacity_bytes: 64MiB, timeout_ms: 2000}}
            shared: {{kind: redis, url: "redis://127.0.0.1:{proxy.port}/0",
                      key_prefix: "io-{time.time_ns()}:", timeout_ms: 300, timeout_s: 30}}
            """,
            "default: {read: [dram, shared], write: [dram, shared], load: always}\n",
        )
        prompts = [_tokens(100 + i, n_chunks=2) for i in range(16)]
        with LoopProbe() as probe:
            started = time.monotonic()
            for i, tokens in enumerate(prompts):
                plan = orch.lookup(tokens, RequestContext())
                assert orch.save(plan, 0, _kv(2 * i)) and orch.save(plan, 1, _kv(2 * i + 1))
            assert orch.flush(10)
            flushed = time.monotonic() - started
            lookups = []
            for tokens in prompts:
                started = time.monotonic()
                plan = orch.lookup(tokens, RequestContext())
                lookups.append(time.monotonic() - started)
                assert [c.tier for c in plan.chunks] == ["dram", "dram"], plan.reason
        probe.check(f"{link} redis")
        t = orch.telemetry
        print(
            f"{link}: flush {flushed:.3f} s, lookups max {max(lookups) * 1e3:.1f} ms, "
            f"loop samples {len(probe.samples)}, "
            f"max loop latency {max(s[1] for s in probe.samples) * 1e3:.1f} ms"
        )
        assert flushed < 5, flushed
        assert max(lookups) < 0.3 + 0.5, lookups
        written = t.value("kvstrata_tier_ops_total", tier="shared", op="put", result="ok")
        if link == "slow":
            assert written == 32
        else:
            assert not written
            assert (
                t.value("kvstrata_tier_ops_total", tier="shared", op="contains", result="skipped")
                > 0
            )
    finally:
        proxy.set_rate(0)
        proxy.close()
