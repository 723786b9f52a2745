import os

# Spinning OpenMP threads starve each other when the machine is shared (tests, a training run, CI neighbours).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Bit-identical CPU reruns need a fixed thread count; 2 matches CI's machine.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_avatar():
    from engine.model import Avatar

    return Avatar.from_preset("tiny", seed=0, init="random").eval().requires_grad_(False)
