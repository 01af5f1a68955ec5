import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))  # architectures.py, helpers.py
# Under pytest-xdist (`-n 2`, what CI runs) each worker takes one core: two workers of 2 threads each on 2 cores
# wait on each other's descheduled OpenMP threads (the reversible stack's many small ops: up to 40× slower).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
