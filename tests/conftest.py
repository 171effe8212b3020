"""Shared fixtures: tiny generated datasets in temporary folders, one torch thread for exact numeric comparisons."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def toy_dataset(tmp_path):
    """A 32^3 dataset folder: 4 labelled, 4 unlabelled, 2 test cases, one foreground class."""
    from mnseg.data.toy import make_toy_dataset

    return make_toy_dataset(tmp_path / "Dataset001_Toy")


@pytest.fixture
def toy_dataset_multiclass(tmp_path):
    from mnseg.data.toy import make_toy_dataset

    return make_toy_dataset(tmp_path / "Dataset002_Toy2", num_foreground=2)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: comparisons of two computations then see the same reduction order, and a
    busy shared CPU does not make them slow. (Use with ``pytestmark = pytest.mark.usefixtures(...)``.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
