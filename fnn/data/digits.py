"""The digits data set bundled with scikit-learn: 1,797 real 8x8 handwritten digits.

The split is fixed and needs no random numbers: every fifth image (index 4, 9, 14, ...) is in
the test set (359 images), the rest (1,438) in the training set. Pixels (0..16) are scaled to
[0, 1]; images are channels-last ``float32[N, 8, 8, 1]``, labels ``int32[N]``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    x_train: np.ndarray  # float32[n_train, 8, 8, 1]
    y_train: np.ndarray  # int32[n_train]
    x_test: np.ndarray  # float32[n_test, 8, 8, 1]
    y_test: np.ndarray  # int32[n_test]


def load_digits() -> Split:
    """The digits with the fixed train/test split described in the module docstring."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set ships with scikit-learn: "
                          "pip install 'fnn[train]' (or scikit-learn)") from e
    data = sklearn_digits()
    x = (data.images.astype(np.float32) / 16.0)[..., None]
    y = data.target.astype(np.int32)
    test = np.arange(len(y)) % 5 == 4
    return Split(x[~test], y[~test], x[test], y[test])
