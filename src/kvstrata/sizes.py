"""Byte sizes as operators write them: ``4GiB``, ``1.5 KB``, ``1073741824``.

One parser for the YAML file and the ``KVSTRATA_<KIND>_<FIELD>`` environment
overrides (a tier field typed :data:`ByteCount` accepts both spellings from
either source). Every size is bounded by :data:`MAX_BYTES`, so no spelling
overflows, allocates absurdly or reaches a float's infinity.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

#: The largest size any field accepts (1 PiB); fields may set a tighter ``le``.
MAX_BYTES = 1 << 50

_SIZE = re.compile(r"^\s*(\d{1,40}(?:\.\d{1,40})?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "kib": 2**10,
    "mb": 10**6,
    "mib": 2**20,
    "gb": 10**9,
    "gib": 2**30,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"4GiB"`` -> 4294967296; ``"1.5 KB"`` -> 1500.

    ValueError naming the accepted units for anything else, and for sizes
    over :data:`MAX_BYTES` (so the result is always an int in [0, MAX_BYTES]).
    """
    found = _SIZE.match(text)
    if not found:
        raise ValueError(
            f"invalid size {_shown(text)}: use bytes or a number with a unit "
            "(B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
        )
    whole, _, frac = found[1].partition(".")
    unit = _UNITS[(found[2] or "").lower()]
    # exact integer arithmetic: no float rounding, no overflow
    value = int(whole) * unit + (int(frac) * unit) // 10 ** len(frac) if frac else int(whole) * unit
    if value > MAX_BYTES:
        raise ValueError(f"size {_shown(text.strip())} is over the 1 PiB limit")
    return value


def _shown(text: str) -> str:
    """``text`` quoted for a message, cut at 40 characters."""
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}..."


def _size(value: Any) -> Any:
    """A string is parsed as a size; anything else is left to the field's own type check."""
    return parse_bytes(value) if isinstance(value, str) else value


#: An int field that also accepts ``"8GiB"`` -- from YAML and from environment variables alike.
ByteCount = Annotated[int, BeforeValidator(_size)]
