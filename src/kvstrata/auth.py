"""Object authentication: who may write what readers accept.

Checksums catch accidents; they do not stop a writer with access to a shared
store (Redis, S3) from planting well-formed KV under the right key. Objects of
format v2 (:mod:`kvstrata.format`) therefore carry keyed MACs: BLAKE3 in keyed
mode, with a key derived per namespace from the deployment's secret::

    section key = BLAKE3-derive-key("kvstrata 2026-12 section tag v2", secret || namespace)
    header key  = BLAKE3-derive-key("kvstrata 2026-12 header MAC v2", secret || namespace)
    section tag = BLAKE3-keyed(section key, section)[:16]      (one per layer)
    header MAC  = BLAKE3-keyed(header key, header bytes)[:32]  (covers the table of tags)

(Two keys rather than one key and a prefix byte: a prefix shifts every section off
BLAKE3's 1 KiB chunk boundaries and costs ~30% of the hashing speed.)

Only holders of the secret can produce an object a reader accepts; a layer
range is verified with the header MAC and its own sections' tags, so ranged
reads stay ranged. Namespaces (model, dtype, codec, tenant) get independent
keys: a key extracted for one namespace forges nothing in another.

No secret configured is a deliberate mode, not an error: objects are then
MAC'd with a published, well-known secret (:data:`WELL_KNOWN_SECRET`). That
is integrity only -- the MAC still catches every accidental corruption, but
anyone can forge -- and :func:`keyring_from_env` says so in a warning when a
shared tier is configured. Every host sharing a store must use the same
secret (a per-installation random default would silently break sharing).

The secret is never logged and never part of a ``repr``.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Mapping

import blake3

log = logging.getLogger(__name__)

#: The secret used when none is configured: public, so MACs made with it are integrity only.
WELL_KNOWN_SECRET = b"kvstrata: no secret configured -- integrity only, anyone can forge"
#: The environment variable a secret comes from unless the configuration names another.
DEFAULT_SECRET_ENV = "KVSTRATA_SECRET"
MIN_SECRET_BYTES = 16
SECTION_TAG_BYTES = 16
HEADER_MAC_BYTES = 32
_SECTION_CONTEXT = "kvstrata 2026-12 section tag v2"
_HEADER_CONTEXT = "kvstrata 2026-12 header MAC v2"
_MAX_CACHED_NAMESPACES = 4096


class Keyring:
    """A deployment secret and what readers accept; derives (and caches) per-namespace keys.

    Thread-safe; shared by every tier of an orchestrator. ``authenticated`` is
    False when no secret was configured (the well-known secret is in use).
    ``allow_unauthenticated`` lets readers accept format v1 objects, which
    carry checksums but no MAC.
    """

    __slots__ = ("_secret", "authenticated", "allow_unauthenticated", "_keys", "_lock")

    def __init__(self, secret: bytes | None = None, allow_unauthenticated: bool = False):
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the object secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = WELL_KNOWN_SECRET if secret is None else bytes(secret)
        self.authenticated = secret is not None
        self.allow_unauthenticated = allow_unauthenticated
        self._keys: dict[bytes, tuple[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Keyring(authenticated={self.authenticated}, "
            f"allow_unauthenticated={self.allow_unauthenticated})"
        )

    def keys(self, namespace: bytes) -> tuple[bytes, bytes]:
        """The (section key, header key) of ``namespace`` (a 32-byte fingerprint), 32 bytes each."""
        keys = self._keys.get(namespace)
        if keys is None:
            material = self._secret + bytes(namespace)  # the namespace has a fixed length
            keys = (
                blake3.blake3(material, derive_key_context=_SECTION_CONTEXT).digest(),
                blake3.blake3(material, derive_key_context=_HEADER_CONTEXT).digest(),
            )
            with self._lock:
                if len(self._keys) >= _MAX_CACHED_NAMESPACES:
                    self._keys.clear()
                self._keys[bytes(namespace)] = keys
        return keys


def section_tag(section_key: bytes, section: bytes | memoryview) -> bytes:
    """The 16-byte tag of one section under a namespace's section key."""
    return blake3.blake3(section, key=section_key).digest(SECTION_TAG_BYTES)


def header_mac(header_key: bytes, header: bytes | memoryview) -> bytes:
    """The 32-byte MAC of a header's bytes (everything
    before the MAC) under a namespace's header key."""
    return blake3.blake3(header, key=header_key).digest(HEADER_MAC_BYTES)


def same(a: bytes | memoryview, b: bytes | memoryview) -> bool:
    """Constant-time comparison (a MAC check must not leak how many bytes matched)."""
    return hmac.compare_digest(bytes(a), bytes(b))


#: The keyring of a process that configured nothing: the well-known secret, no v1 reads.
NO_SECRET = Keyring()


def keyring_from_env(
    secret_env: str = DEFAULT_SECRET_ENV,
    allow_unauthenticated: bool = False,
    shared_tiers: tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> Keyring:
    """The keyring of a deployment: the secret from ``$secret_env`` (UTF-8), or none.

    With no secret and ``shared_tiers`` (tiers other writers can reach), warns
    once that objects there are integrity-checked only. ValueError if the
    secret is shorter than :data:`MIN_SECRET_BYTES`.
    """
    value = (os.environ if environ is None else environ).get(secret_env, "")
    if value:
        try:
            return Keyring(value.encode("utf-8"), allow_unauthenticated)
        except ValueError:
            raise ValueError(
                f"${secret_env}: the object secret must be at least {MIN_SECRET_BYTES} bytes"
            ) from None
    if shared_tiers:
        log.warning(
            "no object secret in $%s: objects in shared tiers %s are integrity-checked only "
            "(anyone who can write there can plant KV that is served); set a secret of at "
            "least %d bytes on every host",
            secret_env,
            ", ".join(shared_tiers),
            MIN_SECRET_BYTES,
        )
    return Keyring(None, allow_unauthenticated)


def keyring_for(config) -> Keyring:
    """A :class:`~kvstrata.config.StrataConfig`'s keyring: the secret from ``$auth.secret_env``."""
    shared = tuple(name for name, spec in config.tiers.items() if spec.tier_class.shared)
    return keyring_from_env(config.auth.secret_env, config.auth.allow_unauthenticated_reads, shared)
