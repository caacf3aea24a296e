"""Shared fixtures: real servers (Redis, SeaweedFS S3) started once per test session.

The servers are started by kvstrata's own launcher on 127.0.0.1 and free
ports, and stopped at the end of the session; nothing else is touched.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from kvstrata import format as fmt
from kvstrata import runtime
from kvstrata.keys import ChunkKey, Namespace, chunk_keys
from kvstrata.testing import services as svc
from kvstrata.tiers.base import Tier, create_tier

TIER_KINDS = [
    "memory",
    "lmcache",
    "disk",
    "redis",
    "redis-cluster",
    "s3-obstore",
    "s3-aioboto3",
    "s3-nixl",
]

# scripts/test.sh (and so CI) sets KVSTRATA_NO_SKIP=1: there, a skipped test -- a
# missing vLLM, model or server -- is a failure, never a silent pass.
NO_SKIP = os.environ.get("KVSTRATA_NO_SKIP") == "1"


class LoopWatchdog:
    """Stalls of kvstrata's background loop: a no-op scheduled on it every ``period_s`` that takes
    over ``threshold_s`` is recorded with the running test and the loop thread's stack, and printed
    in the session summary -- evidence for a tier timeout that shows up only in a full run. A stall
    of the whole process (this thread itself late) is recorded too."""

    def __init__(self, threshold_s: float = 1.0, period_s: float = 0.1):
        self.threshold_s, self.period_s = threshold_s, period_s
        self.test = ""
        self.stalls: list[dict] = []
        threading.Thread(target=self._watch, name="kvstrata-loop-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while True:
            before = time.monotonic()
            time.sleep(self.period_s)
            late = time.monotonic() - before - self.period_s
            if late > self.threshold_s:  # this thread did not run either: the whole process stalled
                self.stalls.append(
                    {
                        "test": self.test,
                        "seconds": late,
                        "stack": "(every thread stalled; "
                        "the GIL was held or the process got no CPU)",
                    }
                )
            loop = runtime._loop  # watch the loop once something started it; never start it
            if loop is None or loop.is_closed():
                continue
            started, test = time.monotonic(), self.test
            done = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop)
            stall = None
            while not done.done() and not loop.is_closed():
                time.sleep(0.05)
                if stall is None and time.monotonic() - started > self.threshold_s:
                    frame = sys._current_frames().get(
                        next(
                            (t.ident for t in threading.enumerate() if t.name == "kvstrata-loop"),
                            -1,
                        )
                    )
                    stall = {
                        "test": test,
                        "stack": "".join(traceback.format_stack(frame)) if frame else "?",
                    }
                    self.stalls.append(
                        stall
                    )  # recorded at once: the session may end before the loop is back
                if stall is not None:
                    stall["seconds"] = time.monotonic() - started


WATCHDOG = LoopWatchdog()


def pytest_runtest_logstart(nodeid, location):
    WATCHDOG.test = nodeid


def pytest_terminal_summary(terminalreporter):
    for stall in WATCHDOG.stalls:
        terminalreporter.write_line(
            f"kvstrata loop stalled {stall['seconds']:.1f} s during {stall['test']}, "
            f"its stack:\n{stall['stack']}"
        )


def pytest_collection_modifyitems(config, items):
    """Opt-in markers (``rgw``): deselected -- not skipped, so KVSTRATA_NO_SKIP=1 is content --
    unless the ``-m`` expression names them."""
    markexpr = config.getoption("markexpr") or ""
    opt_in = [m for m in ("rgw",) if m not in markexpr]
    if not opt_in:
        return
    deselected = [item for item in items if any(item.get_closest_marker(m) for m in opt_in)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but KVSTRATA_NO_SKIP=1 forbids skips: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIP and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped, but KVSTRATA_NO_SKIP=1 forbids skips: {report.longrepr}"


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_server(state_dir: Path):
    server = svc.start_redis(state_dir / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(state_dir: Path):
    """A real 3-master + 3-replica Redis Cluster (tests that kill a node build their own)."""
    cluster = svc.start_redis_cluster(state_dir / "redis-cluster")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def rgw_server(state_dir: Path):
    """A real Ceph RGW from scripts/rgw.sh (tests marked ``rgw`` only: opt-in)."""
    server = svc.start_rgw(state_dir / "rgw")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(state_dir: Path):
    server = svc.start_seaweedfs(state_dir / "s3")
    yield server
    server.stop()


def s3_settings(server, transport: str = "obstore", **extra) -> dict:
    return dict(
        endpoint=server.endpoint,
        bucket=server.bucket,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region=svc.REGION,
        transport=transport,
        **extra,
    )


def unique() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
async def make_tier(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., Tier]]:
    """Build a fresh, isolated tier of a kind (own key
    prefix / directory); closed after the test."""
    made: list[Tier] = []

    def build(kind: str, **settings) -> Tier:
        if kind == "memory":
            tier = create_tier("memory", **settings)
        elif kind == "lmcache":  # a small pool: LMCache allocates all of it at start
            tier = create_tier("lmcache", **{"capacity_bytes": 64 << 20, **settings})
        elif kind == "disk":
            tier = create_tier(
                "disk", path=settings.pop("path", tmp_path / f"disk-{unique()}"), **settings
            )
        elif kind == "redis":
            url = request.getfixturevalue("redis_server").url
            tier = create_tier("redis", url=url, key_prefix=f"t-{unique()}:", **settings)
        elif kind == "redis-cluster":
            url = settings.pop("url", None) or request.getfixturevalue("redis_cluster").url
            tier = create_tier("redis", name=kind, url=url, key_prefix=f"t-{unique()}:", **settings)
        elif kind.startswith("s3-"):
            server = request.getfixturevalue("s3_server")
            tier = create_tier(
                "s3",
                name=kind,
                **s3_settings(server, kind[3:], prefix=f"t-{unique()}/", **settings),
            )
        else:
            raise ValueError(kind)
        made.append(tier)
        return tier

    yield build
    for tier in made:
        await tier.close()


@pytest.fixture(params=TIER_KINDS)
def tier(request: pytest.FixtureRequest, make_tier) -> Tier:
    return make_tier(request.param)


# -- objects ----------------------------------------------------------------

NAMESPACE = Namespace("test-model", "float32")


def make_object(
    key: ChunkKey, n_layers: int = 5, section_bytes: int = 1000, seed: int = 0, ragged: bool = True
) -> tuple[bytes, list[bytes]]:
    """A valid encoded object with random sections (ragged sizes unless told otherwise)."""
    rng = np.random.default_rng(seed)
    sizes = [section_bytes + (int(rng.integers(0, 64)) if ragged else 0) for _ in range(n_layers)]
    sections = [rng.bytes(s) for s in sizes]
    meta = fmt.ObjectMeta("none", "float32", 16, 2, 8, NAMESPACE.fingerprint, key.digest)
    return fmt.encode(meta, sections), sections


def make_keys(n: int, seed: int | None = None) -> list[ChunkKey]:
    rng = np.random.default_rng(
        seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    )
    return chunk_keys(rng.integers(0, 50000, size=16 * n), NAMESPACE, 16)
