"""The S3 tier's AWS SDK transport (aioboto3), for deployments that standardise on botocore
(credential chains, custom signers). The prefix is added here, not by the tier."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from kvstrata.tiers.s3.settings import S3Settings


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
