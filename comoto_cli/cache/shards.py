"""How a shard cache (``comoto preprocess ... --shard K/N``) marks itself: the ``K/N`` root attribute and the
``/shard`` group that maps its volumes to their places in the full plan, so ``comoto cache merge`` can join them."""

from __future__ import annotations

from comoto_cli.errors import UsageError

SHARD_ATTR = "shard"  # root attribute of a shard: "K/N"
SHARD_GROUP = "shard"  # its group: dataset plan_index, attribute plan_size (volumes in the full plan)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N, or a one-line :class:`UsageError`."""
    parts = str(text).strip().split("/")
    numbers = [int(p) for p in parts if p.strip().isdigit()]
    if len(parts) != 2 or len(numbers) != 2 or not 1 <= numbers[0] <= numbers[1]:
        raise UsageError(f"shard must be K/N with 1 <= K <= N (for example 2/8), got {text!r}")
    return numbers[0], numbers[1]
