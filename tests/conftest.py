import pytest

import keyfailover as kf

# Realistic-looking fake keys: long enough to be masked as "sk-a...wxyz".
FAKE_KEYS = [f"sk-ant-test-{i}-{'x' * 24}{i:04d}" for i in range(8)]


@pytest.fixture
def clock() -> kf.ManualClock:
    return kf.ManualClock()


@pytest.fixture
def make_pool(clock: kf.ManualClock):
    def make(n: int = 3, **kwargs) -> kf.KeyPool:
        return kf.KeyPool(FAKE_KEYS[:n], clock=clock, **kwargs)

    return make
