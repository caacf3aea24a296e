"""What the S3 tier needs from a client library: :class:`Transport`.

Implementations: :mod:`.obstore_transport` (default), :mod:`.aioboto3_transport`,
:mod:`.nixl`. :func:`open_transport` picks one from the settings, importing
only the library it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvstrata.tiers.s3.settings import S3Settings


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


def open_transport(name: str, settings: S3Settings) -> tuple[Transport, str]:
    """The transport ``settings.transport`` names, and the prefix the tier adds to each path
    (aioboto3's transport adds the prefix itself)."""
    if settings.transport == "obstore":
        from kvstrata.tiers.s3.obstore_transport import ObstoreTransport

        return ObstoreTransport(settings), settings.prefix
    if settings.transport == "nixl":  # optional extra kvstrata[nixl]: imported only here
        from kvstrata.tiers.s3.nixl import NixlTransport

        return NixlTransport(name, settings), settings.prefix
    from kvstrata.tiers.s3.aioboto3_transport import Aioboto3Transport

    return Aioboto3Transport(settings), ""
