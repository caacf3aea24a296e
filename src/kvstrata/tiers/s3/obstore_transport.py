"""The S3 tier's default transport: obstore (Rust ``object_store`` under Python).

Measured here at 3-4x less client CPU per GB than boto3, which matters when
client and server share two cores. Reads return zero-copy views of Rust memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from kvstrata.tiers.s3.settings import S3Settings


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
        return await self.size(path) is not None

    async def size(self, path: str) -> int | None:
        """The object's size in bytes (one HEAD), None if it is absent."""
        try:
            meta = await self._ob.head_async(self._store, path)
        except FileNotFoundError:
            return None
        return int(meta["size"])

    async def remove(self, paths: Sequence[str]) -> None:
        await self._ob.delete_async(self._store, list(paths))

    async def close(self) -> None:
        pass  # the Rust client closes its pool when dropped


_RANGE_NOT_SATISFIABLE = "416 Range Not Satisfiable"
