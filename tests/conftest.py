import pytest
import torch

# Training uses one torch thread (Config.torch_threads); tests do the same, which is much
# faster for these small networks and keeps results independent of the machine's cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts with one torch thread, whatever an earlier test (or a training
    run with another ``torch_threads``) left behind."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
