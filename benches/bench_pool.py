"""Hot-path cost of the key pool from Python: `python benches/bench_pool.py [--smoke]`.

Prints ns per operation (best of five runs) for the same operations as
`cargo bench --bench pool`, so the two can be read side by side.
"""

import sys
import time

from keyfailover import KeyPool


def best_ns_per_op(iterations: int, op) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        op(iterations)
        best = min(best, (time.perf_counter_ns() - start) / iterations)
    return best


def main() -> None:
    iterations = 10_000 if "--smoke" in sys.argv else 300_000
    pool = KeyPool([f"sk-bench-key-{i:04}-abcdefghijklmnop" for i in range(4)])

    def loop(n: int) -> None:
        for _ in range(n):
            pass

    def next_only(n: int) -> None:
        for _ in range(n):
            pool.walker().next()

    def next_mark(n: int) -> None:
        for _ in range(n):
            key = pool.walker().next()
            key.mark_temporary(60.0)
            key.reset()

    empty = best_ns_per_op(iterations, loop)
    for name, op in [
        ("walker().next()", next_only),
        ("walker().next().mark_temporary()+reset()", next_mark),
    ]:
        print(f"{name:44} {best_ns_per_op(iterations, op) - empty:8.1f} ns/op")


if __name__ == "__main__":
    main()
