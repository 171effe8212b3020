"""Shared fixtures: tiny generated datasets in temporary folders."""

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
