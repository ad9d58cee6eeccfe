"""Test helpers shared by the assignments' own test suites (not used at run time; pytest is a dev dependency)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Imported into a test module, runs its tests on one torch thread: tiny models gain nothing from threads,
    and on a loaded 2-core CI machine OpenMP threads only contend (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
