"""The held-out split of live traffic: which traces no drafter ever trains on.

A trace is held out when the hash of its prompt's token ids falls in the lowest ``fraction`` of the hash
space. The split is a pure function of the prompt, so the same prompt is on the same side in every window,
every table and every process (a prompt is never both trained on and measured on), and it needs no state.
The trainer skips held-out traces; the served evaluation replays them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def prompt_digest(prompt_token_ids: Sequence[int]) -> bytes:
    """sha256 of the prompt's token ids as little-endian int32: the prompt's identity across the lake."""
    return hashlib.sha256(struct.pack(f"<{len(prompt_token_ids)}i", *prompt_token_ids)).digest()


def is_held_out(prompt_token_ids: Sequence[int], fraction: float) -> bool:
    """Whether a prompt belongs to the held-out ``fraction`` of traffic (0: nothing is held out)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), not {fraction}")
    if fraction == 0.0:
        return False
    bucket = int.from_bytes(prompt_digest(prompt_token_ids)[:8], "big")
    return bucket < fraction * 2**64
