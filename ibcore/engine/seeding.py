"""Seeds derived from names and numbers, so randomness never depends on the order of runs in a file."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (strings, numbers, JSON-able values)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1
