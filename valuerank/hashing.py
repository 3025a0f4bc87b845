"""Map raw integer ids to embedding rows.

With hashing on, an id goes through the splitmix64 finalizer (a bijection on 64 bits with
good avalanche) and then modulo the table size. Ids from an unbounded space then spread
over the table, and distinct ids collide only as often as random placement would make them.
With hashing off, ids must already lie in [0, num_embeddings). Any other id is an error,
not a silent lookup of row 0.
"""

from __future__ import annotations

import numpy as np

from valuerank.config import SparseFeature

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """Return the splitmix64 finalizer of int64 ids as uint64."""
    x = ids.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _MIX_1
        x = x ^ (x >> np.uint64(27))
        x = x * _MIX_2
        x = x ^ (x >> np.uint64(31))
    return x


def bucketize_ids(ids: np.ndarray, feature: SparseFeature, source: str = "") -> np.ndarray:
    """Return the embedding row of each id for ``feature`` as int64."""
    if feature.hashing:
        return (splitmix64(ids) % np.uint64(feature.num_embeddings)).astype(np.int64)

    bad = (ids < 0) | (ids >= feature.num_embeddings)
    if bad.any():
        example = int(ids[bad][0])
        raise ValueError(
            f"{source or feature.column}: id {example} is outside [0, {feature.num_embeddings}) for "
            f"sparse feature {feature.name!r} ({int(bad.sum())} such ids); raise num_embeddings "
            "or set hashing = true"
        )
    return ids.astype(np.int64)
