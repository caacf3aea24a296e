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
Cluster; pipelines are then split per slot by redis-py, and multi-key gets
use a pipeline instead of ``MGET`` (whose keys would span slots).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from kvstrata.keys import ChunkKey
from kvstrata.tiers.base import PutResult, RangedTier, ReadRequest, TierError, TierSettings, register

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
    ttl_s: int | None = Field(default=24 * 3600, gt=0, le=10 * 365 * 86400, description="None keeps objects forever")
    max_connections: int = Field(default=64, gt=0, le=100_000)
    timeout_s: float = Field(default=5.0, gt=0, le=3600)


@register
class RedisTier(RangedTier):
    kind = "redis"
    settings_class = RedisSettings

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

    async def _pipeline(self, op: str, commands) -> list:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for command in commands:
                    command(pipe)
                return await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TierError(self.name, op, exc) from exc

    async def _call(self, op: str, command) -> object:
        """One command sent on its own: a pipeline costs more client CPU than the command."""
        try:
            return await command
        except (RedisError, OSError) as exc:
            raise TierError(self.name, op, exc) from exc

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        found = await self._pipeline("contains", [lambda p, k=k: p.exists(self._name(k)) for k in keys])
        return [bool(n) for n in found]

    async def _read(self, requests: Sequence[ReadRequest]) -> list[bytes | None]:
        """One round trip: GET/GETRANGE for one request, MGET for whole objects, else a pipeline."""
        if not requests:
            return []
        if len(requests) == 1:
            blobs = [await self._call("get", self._read_command(self._client, requests[0]))]
        elif not self._cluster and all(_whole(r) for r in requests):
            # MGET spans hash slots, so not in cluster mode (redis-py would refuse it).
            names = [self._name(r.key) for r in requests]
            blobs = await self._call("get", self._client.mget(names))
        else:
            blobs = await self._pipeline(
                "get", [lambda p, r=r: self._read_command(p, r) for r in requests]
            )
        # GETRANGE of a missing key is b"": objects are never empty, so that is "absent".
        return [b if b else None for b in blobs]  # type: ignore[union-attr]

    def _read_command(self, client, r: ReadRequest):
        """GET or GETRANGE of ``r`` on a client (returns the awaitable) or a pipeline (queues it)."""
        name = self._name(r.key)
        if _whole(r):
            return client.get(name)
        return client.getrange(name, r.start, -1 if r.end is None else r.end - 1)

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        if not items:
            return PutResult(0)
        ttl = self.settings.ttl_s
        await self._pipeline("put", [lambda p, k=k, d=d: p.set(self._name(k), d, ex=ttl) for k, d in items])
        self._forget_all([k for k, _ in items])
        return PutResult(len(items))

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        if keys:
            await self._pipeline("delete", [lambda p, k=k: p.delete(self._name(k)) for k in keys])
        self._forget_all(keys)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass  # closing a dead connection is not an error worth raising


def _whole(r: ReadRequest) -> bool:
    return r.start == 0 and r.end is None
