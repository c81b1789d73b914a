import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and far faster when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
