"""Which bytewax worker an instance lives on, and the key that keeps its operators there.

bytewax 0.21.1 routes a keyed item to worker ``hash(key) % worker_count`` (``stateful_batch``
partitions with Rust's ``DefaultHasher``: SipHash-1-3, keys 0 and 0, over the key's UTF-8
bytes and a 0xFF terminator). Left to that hash, 200 instance names split unevenly over two
workers (a binomial draw: often 110/90), and an instance's snapshots cross to another process
whenever its key hashes elsewhere than its scrape runs. So the source places the instances
itself (:func:`placement`: where the name hashes, then evened out) and keys each instance's
snapshots with the first of ``name``, ``name#1``, ``name#2``... that hashes to that same
worker: an even split (±1), the same on every start, and no snapshot ever leaves the process
that scraped it. Should a later
bytewax hash differently, the routing stays correct (bytewax delivers by key, whatever the
key); only the placement would be off, which tests/test_fleet.py would show.
"""

from __future__ import annotations

_MASK = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _MASK
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _MASK
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def key_hash(key: str) -> int:
    """Rust's ``DefaultHasher::default()`` over ``key`` as a ``String`` (SipHash-1-3, zero keys)."""
    data = key.encode() + b"\xff"
    v0, v1, v2, v3 = 0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573
    tail = len(data) % 8
    for i in range(0, len(data) - tail, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= m
    b = ((len(data) & 0xFF) << 56) | int.from_bytes(data[len(data) - tail :], "little")
    v3 ^= b
    v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def worker_of(key: str, worker_count: int) -> int:
    """The worker bytewax 0.21.1 runs ``key``'s stateful step on."""
    return key_hash(key) % worker_count


def routing_key(name: str, worker: int, worker_count: int) -> str:
    """The first of ``name``, ``name#1``, ``name#2``... that bytewax routes to ``worker``."""
    key, n = name, 0
    while worker_of(key, worker_count) != worker:  # one try in worker_count succeeds: ~worker_count tries
        n += 1
        key = f"{name}#{n}"
    return key


def placement(names: list[str], worker_count: int) -> dict[str, int]:
    """Instance name -> worker: an even split (±1) that moves few instances when one is added.

    Each worker has room for its share (the first ``n % worker_count`` one more); in the order
    of their hashes, each instance goes to the worker its name hashes to or, that one full, the
    next one with room. So an instance mostly keeps its worker (and its ledger, in that
    process's state directory) across restarts and configuration changes: adding or removing
    one instance moves a few others at most, never all.
    """
    n = len(names)
    room = [n // worker_count + (1 if w < n % worker_count else 0) for w in range(worker_count)]
    where: dict[str, int] = {}
    for name in sorted(names, key=lambda x: (key_hash(x), x)):
        w = worker_of(name, worker_count)
        while room[w] == 0:
            w = (w + 1) % worker_count
        room[w] -= 1
        where[name] = w
    return where
