"""S3 tier: any S3-compatible endpoint (AWS, Ceph RGW, SeaweedFS, MinIO).

One object per chunk under ``<prefix><key hex>``. A layer range is one ranged
GET (see :class:`~kvstrata.tiers.base.RangedTier`), so reading layers [a, b)
of N chunks costs N GETs, not N x (b - a).

The bytes move through a *transport*, chosen in settings:

* ``obstore`` (default): Rust (``object_store``) under Python; measured here
  at 3-4x less client CPU per GB than boto3, which matters when client and
  server share two cores.
* ``aioboto3``: the AWS SDK, for deployments that standardise on botocore
  (credential chains, custom signers).
* ``nixl``: NIXL's OBJ plugin (``kvstrata.tiers.s3.nixl``, extra
  ``kvstrata[nixl]``), for stacks that move KV with NIXL.

Retries are bounded (``max_retries``) and every request has ``timeout_s``, so
a dead endpoint fails fast with :class:`TierError` instead of hanging a load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Literal, Protocol

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


class S3Settings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTRATA_S3_", frozen=True, extra="forbid")

    endpoint: str | None = Field(default=None, description="None means AWS's own endpoint")
    bucket: str = "kvstrata"
    prefix: str = "kv/"
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    addressing: Literal["path", "virtual"] = "path"
    transport: Literal["obstore", "aioboto3", "nixl"] = "obstore"
    timeout_s: float = Field(default=10.0, gt=0, le=3600)
    max_retries: int = Field(default=2, ge=0, le=100)
    max_concurrency: int = Field(
        default=32, gt=0, le=100_000, description="requests in flight per tier"
    )


class Transport(Protocol):
    """Moves whole objects and byte ranges. Raises its library's errors; the tier maps them.

    ``read`` answers ``None`` for an absent object and ``b""`` for a range that starts at
    or past the end of a present one (HTTP 416: a truncated object is that object's
    problem, not the backend's).
    """

    async def read(self, path: str, start: int, end: int | None) -> bytes | memoryview | None: ...
    async def write(self, path: str, data: bytes) -> None: ...
    async def exists(self, path: str) -> bool: ...
    async def remove(self, paths: Sequence[str]) -> None: ...
    async def close(self) -> None: ...


class ObstoreTransport:
    def __init__(self, s: S3Settings):
        import obstore
        from obstore.store import S3Store

        self._ob = obstore
        config = {"region": s.region, "virtual_hosted_style_request": s.addressing == "virtual"}
        if s.endpoint:
            config["endpoint"] = s.endpoint
        if s.access_key_id and s.secret_access_key:
            config["access_key_id"] = s.access_key_id.get_secret_value()
            config["secret_access_key"] = s.secret_access_key.get_secret_value()
        self._store = S3Store(
            s.bucket,
            config=config,
            client_options={
                "allow_http": bool(s.endpoint and s.endpoint.startswith("http://")),
                "timeout": timedelta(seconds=s.timeout_s),
                "connect_timeout": timedelta(seconds=min(s.timeout_s, 5.0)),
            },
            retry_config={
                "max_retries": s.max_retries,
                "retry_timeout": timedelta(seconds=s.timeout_s),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=50),
                    "max_backoff": timedelta(seconds=1),
                },
            },
        )

    async def read(self, path: str, start: int, end: int | None) -> memoryview | None:
        # obstore's Bytes is a zero-copy buffer over Rust memory: no copy into Python bytes.
        try:
            if start == 0 and end is None:
                result = await self._ob.get_async(self._store, path)
                return memoryview(await result.bytes_async())
            stop = (1 << 62) if end is None else end  # a range past the end is cut to the end
            return memoryview(
                await self._ob.get_range_async(self._store, path, start=start, end=stop)
            )
        except FileNotFoundError:
            return None
        except self._ob.exceptions.BaseError as exc:
            if _RANGE_NOT_SATISFIABLE in str(exc):  # obstore keeps the status only in its message
                return b""
            raise

    async def write(self, path: str, data: bytes) -> None:
        await self._ob.put_async(self._store, path, data, use_multipart=False)

    async def exists(self, path: str) -> bool:
        try:
            await self._ob.head_async(self._store, path)
            return True
        except FileNotFoundError:
            return False

    async def remove(self, paths: Sequence[str]) -> None:
        await self._ob.delete_async(self._store, list(paths))

    async def close(self) -> None:
        pass  # the Rust client closes its pool when dropped


class Aioboto3Transport:
    def __init__(self, s: S3Settings):
        self._s = s
        self._client = None
        self._stack = contextlib.AsyncExitStack()
        self._opening = asyncio.Lock()

    async def _c(self):
        if self._client is None:
            async with self._opening:
                if self._client is None:
                    # Importing aioboto3, botocore reading its JSON models, aioboto3 importing its
                    # S3 helpers: 1-2 s on the event loop the first time, measured. Done in a
                    # thread, what is left on the loop is ~20 ms of object building.
                    session = await asyncio.to_thread(_s3_session)
                    from botocore.config import Config

                    s = self._s
                    self._client = await self._stack.enter_async_context(
                        session.client(
                            "s3",
                            endpoint_url=s.endpoint,
                            region_name=s.region,
                            aws_access_key_id=s.access_key_id
                            and s.access_key_id.get_secret_value(),
                            aws_secret_access_key=s.secret_access_key
                            and s.secret_access_key.get_secret_value(),
                            config=Config(
                                s3={"addressing_style": s.addressing},
                                connect_timeout=min(s.timeout_s, 5.0),
                                read_timeout=s.timeout_s,
                                retries={"max_attempts": s.max_retries + 1, "mode": "standard"},
                                max_pool_connections=s.max_concurrency,
                                # CRC32 of every body, computed on the event loop: 16 puts of
                                # 1 MiB at once held it ~140 ms (measured). Objects carry their own
                                # per-layer checksums, verified on every read.
                                request_checksum_calculation="when_required",
                                response_checksum_validation="when_required",
                            ),
                        )
                    )
        return self._client

    def _absent(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("NoSuchKey", "404", "NotFound")

    def _past_the_end(self, exc: Exception) -> bool:
        response = getattr(exc, "response", {})
        return (
            response.get("Error", {}).get("Code") == "InvalidRange"
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416
        )

    async def read(self, path: str, start: int, end: int | None) -> bytes | None:
        client = await self._c()
        kwargs = (
            {}
            if start == 0 and end is None
            else {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        )
        try:
            response = await client.get_object(
                Bucket=self._s.bucket, Key=self._s.prefix + path, **kwargs
            )
            async with response["Body"] as body:
                return await body.read()
        except Exception as exc:
            if self._absent(exc):
                return None
            if self._past_the_end(exc):
                return b""
            raise

    async def write(self, path: str, data: bytes) -> None:
        client = await self._c()
        await client.put_object(Bucket=self._s.bucket, Key=self._s.prefix + path, Body=data)

    async def exists(self, path: str) -> bool:
        client = await self._c()
        try:
            await client.head_object(Bucket=self._s.bucket, Key=self._s.prefix + path)
            return True
        except Exception as exc:
            if self._absent(exc):
                return False
            raise

    async def remove(self, paths: Sequence[str]) -> None:
        client = await self._c()
        objects = [{"Key": self._s.prefix + p} for p in paths]
        for i in range(0, len(objects), 1000):  # the S3 API's batch limit
            await client.delete_objects(
                Bucket=self._s.bucket, Delete={"Objects": objects[i : i + 1000]}
            )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


@register
class S3Tier(RangedTier):
    kind = "s3"
    settings_class = S3Settings

    def __init__(self, name: str, settings: S3Settings):
        super().__init__(name)
        self.settings = settings
        if settings.transport == "obstore":
            self._transport: Transport = ObstoreTransport(settings)
            self._prefix = settings.prefix
        elif settings.transport == "nixl":  # optional extra kvstrata[nixl]: imported only here
            from kvstrata.tiers.s3.nixl import NixlTransport

            self._transport = NixlTransport(name, settings)
            self._prefix = settings.prefix
        else:
            self._transport = Aioboto3Transport(settings)
            self._prefix = ""  # aioboto3 transport prepends the prefix
        self._slots = asyncio.Semaphore(settings.max_concurrency)

    def _path(self, key: ChunkKey) -> str:
        return self._prefix + str(key)

    async def _each(self, op: str, func, items: Sequence) -> list:
        async def one(item):
            async with self._slots:
                return await func(item)

        try:
            return await asyncio.gather(*(one(i) for i in items))
        except Exception as exc:  # every transport error, whatever the library
            raise TierError(self.name, op, _describe(exc)) from exc

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return await self._each("contains", lambda k: self._transport.exists(self._path(k)), keys)

    async def _read(self, requests: Sequence[ReadRequest]) -> list[bytes | memoryview | None]:
        return await self._each(
            "get", lambda r: self._transport.read(self._path(r.key), r.start, r.end), requests
        )

    async def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> PutResult:
        await self._each(
            "put", lambda item: self._transport.write(self._path(item[0]), item[1]), items
        )
        self._forget_all([k for k, _ in items])
        return PutResult(len(items))

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        if keys:
            try:
                await self._transport.remove([self._path(k) for k in keys])
            except Exception as exc:
                raise TierError(self.name, "delete", _describe(exc)) from exc
        self._forget_all(keys)

    async def close(self) -> None:
        await self._transport.close()


def _s3_session():
    """An aioboto3 session with what creating an S3 client reads from disk already loaded
    (modules, models, endpoint rules). Blocking: call it in a thread."""
    import importlib

    import aioboto3
    import botocore.config  # noqa: F401  (imported here, not on the loop)

    session = aioboto3.Session()
    core = session._session  # aiobotocore's session: a botocore Session
    loader = core.get_component("data_loader")
    loader.load_service_model("s3", "service-2")
    loader.load_service_model("s3", "endpoint-rule-set-1")
    for name in ("endpoints", "partitions", "_retry", "sdk-default-configuration"):
        # an optional file this botocore does not have: it loads nothing then
        with contextlib.suppress(Exception):
            loader.load_data(name)
    core.get_component("endpoint_resolver")
    importlib.import_module("aioboto3.s3.inject")
    return session


_RANGE_NOT_SATISFIABLE = "416 Range Not Satisfiable"


def _describe(exc: BaseException) -> str:
    # Library messages can be long multi-line dumps; keep the first line.
    # They carry the URL but never the secret key.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
