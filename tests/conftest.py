import importlib.util
import os
import sys

import pytest
import torch

# Let the suite run from a plain checkout (src layout) even when natgrad is not installed.
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if importlib.util.find_spec("natgrad") is None and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

@pytest.fixture(autouse=True)
def _single_thread():
    """Every test runs on one thread: the suite shares 2 cores and tiny tensors gain nothing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

# NOTE: the default dtype stays float32 on purpose: models and data are made float64
# explicitly, so a library that silently creates float32 tensors is caught.


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
