import os
import sys

import pytest
import torch

# Let the suite run from a plain checkout (src layout) even when natgrad is not installed.
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
try:
    import natgrad  # noqa: F401
except ImportError:
    if _SRC not in sys.path:
        sys.path.insert(0, _SRC)

# The correctness suite's tensors are tiny: intra-op threads only add overhead, and under
# CPU contention (parallel jobs) spinning worker threads slow it down many times over. Only
# these modules run single-threaded (benchmark tests keep the machine's setting).
_SINGLE_THREADED = {
    "test_reference", "test_fisher_exact", "test_structures", "test_contract", "test_mc",
    "test_ekfac", "test_bad_input", "test_model_unchanged", "test_matrix_is_fixed",
    "test_internal_chunking",
}


@pytest.fixture(autouse=True)
def _single_thread(request):
    name = getattr(request.module, "__name__", "").rpartition(".")[2]
    if name not in _SINGLE_THREADED:
        yield
        return
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
