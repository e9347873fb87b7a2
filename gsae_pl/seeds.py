"""Seeds of named random streams (data, held-out rows, resampling), one per item."""

from __future__ import annotations

import hashlib


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 64-bit generator seed for item `index` of a named stream.

    A hash (not e.g. seed + index) so that neighbouring seeds, steps and ranks never
    collide, and streams with different names are disjoint.
    """
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
