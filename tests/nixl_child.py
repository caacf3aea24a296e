"""A child process for tests/test_io_bounds.py: a NIXL S3 tier whose endpoint is killed while
transfers run, then closed; a watcher thread measures how late it wakes (a process-wide stall
holds it too), until the agent is freed and collected.

Run as ``python -m tests.nixl_child STATE_DIR``; prints one JSON line, then ``exiting``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import time
import weakref

from kvstrata.testing import services as svc
from kvstrata.tiers.base import TierError, create_tier
from tests.conftest import make_keys, make_object, s3_settings

LATE: list[float] = []


def watch(period: float = 0.02) -> None:
    """Record how late this thread wakes: every thread stands still in a process-wide stall."""
    while True:
        before = time.monotonic()
        time.sleep(period)
        LATE.append(time.monotonic() - before - period)


async def fail_and_close(server) -> tuple:
    tier = create_tier("s3", **s3_settings(server, "nixl", timeout_s=2.0, max_retries=1))
    keys = make_keys(8)
    objects = [(k, make_object(k, 4, section_bytes=200_000)[0]) for k in keys]
    await tier.put(objects)
    server.kill()
    errors = []  # kept alive like a caller's logs would: their tracebacks hold frames
    ops = {}
    for op, call in (("get", lambda: tier.get(keys)), ("put", lambda: tier.put(objects))):
        started = time.monotonic()
        try:
            await call()
        except TierError as exc:
            errors.append(exc)
        ops[op] = round(time.monotonic() - started, 3)
    transport = tier._transport
    parked = len(transport._parked) + transport._active
    started = time.monotonic()
    await tier.close()
    return transport, ops, parked, time.monotonic() - started, errors


def main(state_dir: str) -> None:
    threading.Thread(target=watch, daemon=True).start()
    server = svc.start_seaweedfs(state_dir)
    try:
        transport, ops, parked, close_s, errors = asyncio.run(fail_and_close(server))
        release = transport.release
        agent = weakref.ref(release._agent)
        release.done.wait(60)
        freed_at = time.monotonic()
        del errors
        gc.collect()
        collect_s = time.monotonic() - freed_at
        time.sleep(0.2)
        print(
            json.dumps(
                {
                    "ops_s": ops,
                    "running_at_close": parked,
                    "close_s": round(close_s, 4),
                    "release": release.outcome,
                    "release_s": round(release.seconds, 3),
                    "collect_s": round(collect_s, 3),
                    "agent_alive": agent() is not None,
                    "max_late_s": round(max(LATE), 3),
                    "samples": len(LATE),
                }
            ),
            flush=True,
        )
    finally:
        server.stop()
    print("exiting", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
