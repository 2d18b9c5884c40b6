"""User-level splits: no user in two splits, the same shares within every country.

A user is (hashed_ip, country), carried as a one-way `user_key`. Within each country the users are
ranked by a seeded hash of their key and cut at the configured fractions (90/5/5 by default), so
the assignment does not depend on input order and a user's conversations always travel together.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from data_prep.conversations import column_of


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{key}".encode()).hexdigest()


def assign_splits(records, kept: list[int], split_cfg) -> tuple[dict[str, list[int]], list[int]]:
    """Return {split: row indices (in input order)} and the rows that had no user id.

    Rows without a user id are their own user (split.missing_user=own_user) or left out (drop).
    """
    names = [name for name, fraction in split_cfg.fractions.items() if fraction > 0]
    fractions = [split_cfg.fractions[n] for n in names]
    if abs(sum(fractions) - 1.0) > 1e-9 or min(split_cfg.fractions.values()) < 0:
        raise ValueError(f"split.fractions must be non-negative and sum to 1, got {dict(split_cfg.fractions)}")
    # Read by Arrow, a column at a time; a conversation's hash only where it has no user id.
    user_of: list[str | None] = column_of(records, kept, "user_key").to_pylist()
    missing = [i for i, key in enumerate(user_of) if key is None]
    anonymous = [kept[i] for i in missing]
    if split_cfg.missing_user != "drop" and missing:
        for i, conversation_hash in zip(missing, column_of(records, anonymous, "conversation_hash").to_pylist()):
            user_of[i] = f"conversation:{conversation_hash}"
    users_by_country: dict[str, set[str]] = defaultdict(set)
    for key, country in zip(user_of, column_of(records, kept, "country").to_pylist()):
        if key is not None:
            users_by_country[country].add(key)
    split_of_user: dict[str, str] = {}
    for country, users in users_by_country.items():
        ranked = sorted(users, key=lambda k: _rank(split_cfg.seed, k))
        for position, key in enumerate(ranked):
            quantile, cumulative = (position + 0.5) / len(ranked), 0.0
            for name, fraction in zip(names, fractions):
                cumulative += fraction
                if quantile < cumulative or name == names[-1]:
                    split_of_user[key] = name
                    break
    splits: dict[str, list[int]] = {name: [] for name in names}
    for row, key in zip(kept, user_of):
        if key is not None:
            splits[split_of_user[key]].append(row)
    return splits, anonymous
