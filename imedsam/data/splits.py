"""Seeded train / validation / test splits."""

from __future__ import annotations

import random

__all__ = ["seeded_split"]


def seeded_split(names: list[str], seed: int, fractions: tuple[float, float]) -> dict[str, list[str]]:
    """Shuffle ``names`` with ``seed``; the first ``fractions[0]`` are train, the next ``fractions[1]`` val, the
    rest test.

    A split whose fraction is above zero gets at least one name whenever there are enough names for each
    such split (rounding would otherwise leave, say, no validation image of two); the largest split gives it.
    """
    train_fraction, val_fraction = fractions
    if min(fractions) < 0 or train_fraction + val_fraction > 1 + 1e-9:
        raise ValueError(f"fractions {tuple(fractions)} must be non-negative with a sum of at most 1")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    wanted = [train_fraction > 0, val_fraction > 0, train_fraction + val_fraction < 1 - 1e-9]
    counts = [int(round(train_fraction * len(order))), int(round(val_fraction * len(order)))]
    if not wanted[2]:  # no test split: validation takes what rounding leaves
        counts[1] = len(order) - counts[0]
    counts.append(len(order) - sum(counts))
    if len(order) >= sum(wanted):
        for index in (i for i, want in enumerate(wanted) if want and counts[i] == 0):
            counts[max(range(3), key=counts.__getitem__)] -= 1
            counts[index] = 1
    n_train, n_val = counts[0], counts[1]
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
