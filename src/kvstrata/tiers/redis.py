"""Redis tier: the shared store several engines read (FlexKV-style).

One Redis string per chunk, under ``<key_prefix><key hex>``, written with a
TTL so a shared store ages out what nobody reads. Layer ranges are served with
``GETRANGE`` (Redis strings support byte ranges), and every batch is one
round trip: a plain command when it holds one request (a pipeline costs more
client CPU than the command itself), ``MGET`` for whole objects, otherwise a
pipeline. So ``get`` of 64 chunks is one or two round trips, not 64.

The connection pool is a blocking pool sized by ``max_connections``: under
more concurrency than that, callers queue for a connection (up to
``timeout_s``) instead of failing with ``MaxConnectionsError``.

``redis+cluster://host:port`` (or ``cluster: true``) connects to a Redis
Cluster (or Valkey in cluster mode: same protocol). One object is one key, so
its bytes never span slots and need no hash tag; a ``key_prefix`` must not
hold one either (``{...}`` would put every object in one slot, one node). A
batch is grouped by the node that owns each key's slot and sent as one
pipeline per node, all nodes at once (``MGET`` is not used: its keys would
span slots). A node that fails (killed master, before its replica takes
over) answers its keys as absent -- a miss for its slots only -- and does not
fail the batch; the tier raises :class:`TierError` only when no primary
answers (every node the batch needed failed, and so does a PING to the
others), so a whole-cluster outage still reaches the orchestrator's breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from kvstrata.keys import ChunkKey
from kvstrata.tiers.base import (
    PutResult,
    RangedTier,
    ReadRequest,
    TierError,
    TierSettings,
    register,
)

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the redis tier needs `pip install 'kvstrata[redis]'`") from exc


class RedisSettings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTRATA_REDIS_", frozen=True, extra="forbid")

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    cluster: bool = False
    key_prefix: str = "kvstrata:"
    ttl_s: int | None = Field(
        default=24 * 3600, gt=0, le=10 * 365 * 86400, description="None keeps objects forever"
    )
    max_connections: int = Field(default=64, gt=0, le=100_000)
    timeout_s: float = Field(default=5.0, gt=0, le=3600)


_DOWN = object()  # the result of a command whose cluster node did not answer


@register
class RedisTier(RangedTier):
    kind = "redis"
    settings_class = RedisSettings
    prior_latency_ms = 0.5
    prior_bandwidth_mbps = 800
    default_timeout_ms = 2000
    shared = True
    supports_ttl = True

    def __init__(self, name: str, settings: RedisSettings):
        super().__init__(name)
        self.settings = settings
        url = settings.url.get_secret_value()
        # One quick retry on a broken connection: after a server restart the pool's idle
        # connections are dead, and the first command on each would fail otherwise.
        # Timeouts are not retried: they would double the wait on a slow server.
        retry = Retry(ExponentialBackoff(cap=0.05, base=0.005), 1, (RedisConnectionError,))
        self._cluster = settings.cluster or url.startswith("redis+cluster://")
        if self._cluster:
            if "{" in settings.key_prefix:
                raise ValueError(
                    "a Redis Cluster key_prefix must not hold a hash tag ({...}): "
                    "every object would land in one slot"
                )
            self._client = aioredis.RedisCluster.from_url(
                url.replace("redis+cluster://", "redis://", 1),
                max_connections=settings.max_connections,
                socket_timeout=settings.timeout_s,
                socket_connect_timeout=settings.timeout_s,
                retry=retry,
            )
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=settings.max_connections,
                timeout=settings.timeout_s,
                socket_timeout=settings.timeout_s,
                socket_connect_timeout=settings.timeout_s,
                retry=retry,
            )
            self._client = aioredis.Redis(connection_pool=pool)

    def _name(self, key: ChunkKey) -> str:
        return self.settings.key_prefix + str(key)

    async def _pipeline(self, op: str, names: Sequence[str], queue: Callable) -> list:
        """One pipelined round trip queueing ``queue(pipe, i)`` for each ``names[i]``; the replies.

        On a cluster: one pipeline per node owning the keys, concurrently; the replies of a
        node that failed are ``_DOWN``. Raises TierError when nothing answered.
        """
        if not self._cluster:
            try:
                return await self._send(range(len(names)), queue)
            except (RedisError, OSError) as exc:
                raise TierError(self.name, op, exc) from exc
        try:
            groups = await self._by_node(names)
        except (RedisError, OSError) as exc:
            raise TierError(self.name, op, exc) from exc
        replies = await asyncio.gather(
            *(self._send(g, queue) for g in groups.values()), return_exceptions=True
        )
        errors = [r for r in replies if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, (RedisError, OSError)):
                raise error
        if (
            errors
            and len(errors) == len(groups)
            and not await self._another_primary_answers(set(groups))
        ):
            raise TierError(self.name, op, errors[0])
        out: list = [_DOWN] * len(names)
        for indices, reply in zip(groups.values(), replies, strict=True):
            if not isinstance(reply, BaseException):
                for i, value in zip(indices, reply, strict=True):
                    out[i] = value
        return out

    async def _send(self, indices: Sequence[int], queue: Callable) -> list:
        async with self._client.pipeline(transaction=False) as pipe:
            for i in indices:
                queue(pipe, i)
            return await pipe.execute()

    async def _by_node(self, names: Sequence[str]) -> dict[str, list[int]]:
        """Indices of ``names`` grouped by the name of the node owning each key's slot."""
        await self._client.initialize()  # a no-op once the topology is known
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            node = self._client.get_node_from_key(name)
            groups.setdefault(node.name if node else "?", []).append(i)
        return groups

    async def _another_primary_answers(self, failed: set[str]) -> bool:
        """Whether a primary outside ``failed`` answers PING: one node is out, not the cluster.
        Asked only when every node a batch needed failed (one round trip, in failure only)."""
        for node in self._client.get_primaries():
            if node.name not in failed:
                try:
                    await self._client.ping(target_nodes=node)
                    return True
                except (RedisError, OSError):
                    continue
        return False

    async def _call(self, op: str, command) -> object:
        """One command sent on its own: a pipeline costs more client CPU than the command."""
        try:
            return await command
        except (RedisError, OSError) as exc:
            raise TierError(self.name, op, exc) from exc

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        found = await self._pipeline("contains", names, lambda p, i: p.exists(names[i]))
        return [n is not _DOWN and bool(n) for n in found]

    async def _read(self, requests: Sequence[ReadRequest]) -> list[bytes | None]:
        """One round trip: GET/GETRANGE for one request, MGET for whole objects, else a pipeline
        (on a cluster always a pipeline per node, so a dead node is a miss, not an error)."""
        if not requests:
            return []
        if len(requests) == 1 and not self._cluster:
            blobs = [await self._call("get", self._read_command(self._client, requests[0]))]
        elif not self._cluster and all(_whole(r) for r in requests):
            # MGET spans hash slots, so not in cluster mode (redis-py would refuse it).
            names = [self._name(r.key) for r in requests]
            blobs = await self._call("get", self._client.mget(names))
        else:
            blobs = await self._pipeline(
                "get",
                [self._name(r.key) for r in requests],
                lambda p, i: self._read_command(p, requests[i]),
            )
        blobs = [None if b is _DOWN else b for b in blobs]  # its cluster node is down: absent
        # GETRANGE gives b"" both for a missing key and for a range past the end of a present
        # (truncated) one; objects are never empty. The rare empty ranged answers are told
        # apart with one EXISTS round trip: b"" (present, too short) is that object's miss.
        empty = [
            i
            for i, (r, blob) in enumerate(zip(requests, blobs, strict=True))
            if blob == b"" and not _whole(r)
        ]
        present = set()
        if empty:
            names = [self._name(requests[i].key) for i in empty]
            found = await self._pipeline("get", names, lambda p, j: p.exists(names[j]))
            present = {i for i, n in zip(empty, found, strict=True) if n is not _DOWN and n}
        return [b"" if i in present else (b or None) for i, b in enumerate(blobs)]

    def _read_command(self, client, r: ReadRequest):
        """GET or GETRANGE of ``r`` on a client (returns
        the awaitable) or a pipeline (queues it)."""
        name = self._name(r.key)
        if _whole(r):
            return client.get(name)
        return client.getrange(name, r.start, -1 if r.end is None else r.end - 1)

    async def put(
        self, items: Sequence[tuple[ChunkKey, bytes]], ttl_s: int | None = None
    ) -> PutResult:
        """``SET ... EX``: objects expire ``ttl_s`` seconds from now (a route's ``ttl_s``), else
        after the tier's ``ttl_s`` (None there: never)."""
        if not items:
            return PutResult(0)
        ttl = ttl_s or self.settings.ttl_s
        names = [self._name(k) for k, _ in items]
        done = await self._pipeline("put", names, lambda p, i: p.set(names[i], items[i][1], ex=ttl))
        self._forget_all([k for k, _ in items])
        return PutResult(sum(1 for d in done if d is not _DOWN))

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        if keys:
            names = [self._name(k) for k in keys]
            await self._pipeline("delete", names, lambda p, i: p.delete(names[i]))
        self._forget_all(keys)

    async def close(self) -> None:
        # closing a dead connection is not an error worth raising
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


def _whole(r: ReadRequest) -> bool:
    return r.start == 0 and r.end is None
