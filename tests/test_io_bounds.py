"""Every tier call bounded and isolated: special files in the disk tier's directory, a stuck
tier's pool, a lookup's wait for in-flight saves, kvstrata's loop never stalled by a tier
call, and a NIXL tier closed while its endpoint is down. What each test proves is written in
docs/reliability.md ("I/O bounds")."""

from __future__ import annotations

import asyncio
import os
import stat
import time
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
async def test_disk_special_file_is_a_miss_for_its_object_only(make_tier, tmp_path, kind: str) -> None:
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
            assert {"fifo": "FIFO", "directory": "directory", "symlink": "symlink",
                    "device": "character device"}[kind] in got[1].detail

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
    blocked_dir, blocked_parent = keys[0], next(k for k in keys[1:] if str(k)[:2] != str(keys[0])[:2])
    plant(Path(tier._file(blocked_dir)), "directory")
    fanout = root / str(blocked_parent)[:2]
    fanout.parent.mkdir(parents=True, exist_ok=True)
    fanout.write_bytes(b"not a directory")
    others = [k for k in keys if k not in (blocked_dir, blocked_parent) and str(k)[:2] != str(blocked_parent)[:2]]
    result = await tier.put([(k, make_object(k)[0]) for k in [blocked_dir, blocked_parent, *others]])
    assert result.stored == len(others)
    assert await tier.contains([blocked_dir, blocked_parent, *others]) == [False, False] + [True] * len(others)


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
    assert isinstance(got, Miss) and got.reason == "corrupt" and "larger than the tier" in got.detail


def test_fifos_in_the_disk_directory_stall_nothing_and_the_process_exits(redis_server, tmp_path) -> None:
    """A process with dram + disk + redis and 20 FIFOs planted under chunk names
    (tests/io_child.py): reading them answers at once (corrupt misses), saves land in memory and
    Redis at their normal rate (best of 3 rounds against the best of 3 before, a shared machine
    varies 5x round to round), the same with every disk thread stuck for good (simulated), and
    the process exits promptly although those threads never return."""
    import json

    lines, exit_s, rc = _run_child("tests.io_child", redis_server.url, str(tmp_path / "disk"))
    out = json.loads(lines[-2])
    close_s = json.loads(lines[-1])["close_s"]
    print(json.dumps({**out, "close_s": close_s, "exit_s": round(exit_s, 3)}))  # the numbers, for the docs
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
    from kvstrata.plan import ModelSpec

    return ModelSpec("io-bounds-model", n_layers=4, kv_heads=2, head_dim=16, dtype="float32")


def _kv(seed: int):
    import numpy as np

    m = _model()
    return np.random.default_rng(seed).standard_normal((m.n_layers, 2, CHUNK, m.kv_heads, m.head_dim), dtype=np.float32)


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
        text = (f"version: 1\nchunk_tokens: {CHUNK}\nengine: {{prefill_tokens_per_s: 1.0}}\n"
                "orchestrator: {save_queue_chunks: 256, breaker: {failures: 3, cooldown_s: 1.0}}\n"
                "tiers:\n" + textwrap.indent(textwrap.dedent(tiers), "  ")
                + "policy:\n" + textwrap.indent(textwrap.dedent(policy), "  "))
        orch = Orchestrator(parse_config(text), _model())
        made.append(orch)
        return orch

    yield build
    for orch in made:
        orch.close(timeout=30)


def test_lookup_waits_for_inflight_saves_only_within_its_budget(redis_server, orchestrator) -> None:
    """A chunk being written to a slow Redis (the real server behind the throttling proxy,
    ~2.5 s per put): a lookup of the same prompt with a 200 ms budget returns within its
    budget (it used to wait up to 2 s); with a 5 s budget it waits, and finds the chunk."""
    from kvstrata.policy.route import RequestContext
    from kvstrata.testing.throttle import ThrottledProxy

    host, port = redis_server.url.split("//")[1].split("/")[0].split(":")
    proxy = ThrottledProxy(host, int(port), bytes_per_s=16_000)
    try:
        orch = orchestrator(f"""\
            dram: {{kind: memory, capacity_bytes: 64MiB, timeout_ms: 10000}}
            slow: {{kind: redis, url: "redis://127.0.0.1:{proxy.port}/0", key_prefix: "io-{time.time_ns()}:",
                    timeout_ms: 20000, timeout_s: 20}}
            """, "default: {read: [dram], write: [dram, slow], load: always}\n")
        for seed, budget_ms, waits in ((1, 200, False), (2, 5000, True)):
            tokens = _tokens(seed)
            first = orch.lookup(tokens, RequestContext())
            assert orch.save(first, 0, _kv(seed))
            time.sleep(0.05)  # the dram put is done; the slow put is on the wire
            started = time.monotonic()
            plan = orch.lookup(tokens, RequestContext(budget_ms=budget_ms))
            took = time.monotonic() - started
            if waits:  # the save finished within the wait: the chunk is found in dram
                assert 0.5 < took < 5.0 and [c.tier for c in plan.chunks] == ["dram"], (took, plan.reason)
            else:
                assert took < budget_ms / 1e3 + 0.15, f"lookup took {took:.3f} s on a {budget_ms} ms budget"
            assert orch.flush(30)
    finally:
        proxy.close()


def _run_child(module: str, *args: str, limit_s: float = 180, exit_s: float = 15) -> tuple[list[str], float, int]:
    """Run ``python -m module args``: its stdout lines up to ``exiting``, how long it took to
    exit after that, and its return code. Fails the test if it never gets there, or hangs there."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-m", module, *args], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines, exiting_at = [], None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and (line := child.stdout.readline()):
            if line.strip() == "exiting":
                exiting_at = time.monotonic()
                break
            lines.append(line)
        assert exiting_at is not None, f"{module} never finished its work (rc={child.poll()}): {lines}"
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
