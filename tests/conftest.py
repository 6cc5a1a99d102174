import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator: every test draws its data reproducibly."""
    return torch.Generator().manual_seed(1234)
