"""An autouse fixture that runs a test module with one intra-op torch thread (import it into the module).

Tiny test tensors gain nothing from a second intra-op thread, and on a loaded machine its barrier waits made the
generation tests 10-100x slower (0.1 s -> 11 s per test measured on 2 shared cores). The previous count is restored
after the module. (Candidate for tests/conftest.py as a session-wide fixture.)
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
