import pytest
import torch

# The tests run tiny tensors, where a second OpenMP thread gains little; on a busy shared
# host it costs much: a ConvMLP-S forward of one 32x32 image took 0.36-0.46 s with two
# threads and 0.026-0.031 s with one (2 cores, load average 11). Tests that need another
# thread count set it themselves; the tools' subprocesses get OMP_NUM_THREADS from the tests.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
