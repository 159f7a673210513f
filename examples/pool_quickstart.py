"""The key pool in a few lines: a rate-limited key, a revoked key, and failover.

Run: python examples/pool_quickstart.py
"""

from keyfailover import KeyPool, ManualClock, TransientExhaustion, mark_key_on_response


def main() -> None:
    clock = ManualClock()
    pool = KeyPool(
        {
            "primary": "sk-ant-demo-primary-0000000000000000",
            "backup": "sk-ant-demo-backup-1111111111111111",
            "spare": "sk-ant-demo-spare-22222222222222222",
        },
        clock=clock,
    )
    # Pretend upstream answers: primary is rate-limited, backup is revoked.
    answers = {"primary": (429, {"retry-after": "20"}), "backup": (401, {}), "spare": (200, {})}

    walker = pool.walker()
    while True:
        key = walker.next()
        status, headers = answers[key.label]
        failed_over = mark_key_on_response(key, status, headers)
        print(f"{key.label:8} ({key.hint}) -> {status}: {'fail over' if failed_over else 'done'}")
        if not failed_over:
            break

    for entry in pool.snapshot():
        print(f"  {entry['label']:8} {entry['state']:10} {entry['cooldown_remaining']:5.1f} s")

    pool.key("spare").mark_temporary(5)
    try:
        pool.walker().next()
    except TransientExhaustion as exc:
        print(f"all keys unavailable: answer 429 with Retry-After {exc.retry_after:.0f}")
    clock.advance(5)
    print(f"5 s later the next request gets {pool.walker().next().label}")


if __name__ == "__main__":
    main()
