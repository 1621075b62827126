"""Datasets: loading TIFF stacks, spatial splits, normalisation, on-device sampling."""

from clidim_jax.data.datasets import PairedImages, load_datasets
from clidim_jax.data.normalization import Normalization
from clidim_jax.data.tiff import DataError, read_tiff

__all__ = ["DataError", "Normalization", "PairedImages", "load_datasets", "read_tiff"]
