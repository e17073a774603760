"""A seeded permutation of window indices, computed one index at a time (O(1) time and memory per window).

Shuffling token-file windows per pass must not depend on the parallel layout, and the number of windows can
reach billions, so no permutation table is built: `shuffled_index(i, count, seed, epoch)` is a keyed Feistel
network on the smallest power-of-4 domain holding `count` values (a bijection on that domain), applied again
while the result falls outside [0, count) ("cycle walking", which keeps it a bijection on [0, count)).
"""

_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def _mix(x: int) -> int:
    """The splitmix64 finalizer: a well-spread 64-bit hash of `x`."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def shuffled_index(index: int, count: int, seed: int, epoch: int) -> int:
    """The window shown at position `index` of pass `epoch` when the passes over `count` windows are shuffled
    with `seed`: a permutation of [0, count), different for every (seed, epoch)."""
    if not 0 <= index < count:
        raise ValueError(f"index {index} is not in [0, {count})")
    half = max(1, ((count - 1).bit_length() + 1) // 2)
    low = (1 << half) - 1
    key = _mix(_mix(seed) ^ epoch)
    x = index
    while True:
        left, right = x >> half, x & low
        for r in range(_ROUNDS):
            left, right = right, left ^ (_mix(key + r * 0x9E3779B97F4A7C15 + right) & low)
        x = (left << half) | right
        if x < count:
            return x
