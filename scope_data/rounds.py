"""Which problems a round trains on: the next batch of a seeded per-epoch shuffle."""

from __future__ import annotations

import random


def round_batch(problem_ids: list[str], round_index: int, per_round: int, seed: int
                ) -> list[str]:
    """The problems of round `round_index` (1-based) when each round takes the next
    `per_round` problems of the table: epoch e is the ids in a shuffled order (seeded by
    `seed` and e) and rounds walk through the epochs back to back, so a batch that reaches the
    end of an epoch continues into the next one (an id the batch already holds from the end of
    the last epoch counts for both). Deterministic: resumed runs and shard jobs agree."""
    ids = sorted(set(problem_ids))
    if not 1 <= per_round <= len(ids):
        raise ValueError(f"prompts_per_round must be in 1..{len(ids)} (the problems in the "
                         f"table), got {per_round}")
    if round_index < 1:
        raise ValueError(f"round must be >= 1, got {round_index}")
    orders: dict[int, list[str]] = {}
    cursor, batch = 0, []
    for _ in range(round_index):
        batch = []
        while len(batch) < per_round:
            epoch, i = divmod(cursor, len(ids))
            if epoch not in orders:
                orders[epoch] = random.Random(f"prompts:{seed}:{epoch}").sample(ids, len(ids))
            if orders[epoch][i] not in batch:
                batch.append(orders[epoch][i])
            cursor += 1
    return batch
