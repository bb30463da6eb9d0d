"""Random iris-shaped inputs, reproducible by seed, for batch tests and benchmarks."""

import random


def random_flowers(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "sepal_length": rng.uniform(4, 8),
            "sepal_width": rng.uniform(2, 4.5),
            "petal_length": rng.uniform(1, 7),
            "petal_width": rng.uniform(0.1, 2.5),
        }
        for _ in range(count)
    ]
