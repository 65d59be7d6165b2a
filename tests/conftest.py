"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core machine torch's spin-waiting
    thread pool is several times slower than one thread. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` or by naming it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
