"""Bundled data sets and batching."""

from fnn.data.batching import batches as batches
from fnn.data.batching import num_batches as num_batches
from fnn.data.digits import Split as Split
from fnn.data.digits import load_digits as load_digits

__all__ = ["batches", "num_batches", "Split", "load_digits"]
