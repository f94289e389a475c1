"""The bundled digits: a fixed split, and reproducible shuffled batches."""

import numpy as np
import pytest

from fnn.data import batches, load_digits


def test_digits_split_is_fixed_and_disjoint():
    data = load_digits()
    assert data.x_train.shape == (1438, 8, 8, 1) and data.x_test.shape == (359, 8, 8, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert set(np.unique(data.y_test)) == set(range(10))
    from sklearn.datasets import load_digits as sklearn_digits
    images = sklearn_digits().images
    np.testing.assert_array_equal(data.x_test[0, ..., 0] * 16, images[4])
    np.testing.assert_array_equal(data.x_train[4, ..., 0] * 16, images[5])


def test_batches_cover_the_data_and_are_reproducible():
    x = np.arange(10)[:, None]
    y = np.arange(10)
    epoch1 = list(batches(x, y, 3, seed=0, epoch=1))
    assert [len(b[1]) for b in epoch1] == [3, 3, 3]  # the remainder is dropped
    seen = np.concatenate([b[1] for b in epoch1])
    assert len(set(seen)) == 9
    again = list(batches(x, y, 3, seed=0, epoch=1))
    for (xa, ya), (xb, yb) in zip(epoch1, again):
        np.testing.assert_array_equal(ya, yb)
    other = np.concatenate([b[1] for b in batches(x, y, 3, seed=0, epoch=2)])
    assert not np.array_equal(seen, other)
    ordered = list(batches(x, y, 4, drop_remainder=False))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in ordered]), y)
    with pytest.raises(ValueError, match="larger than the data"):
        list(batches(x, y, 11))


def test_num_batches_takes_drop_remainder_as_batches_does():
    from fnn.data import num_batches

    assert num_batches(10, 4) == 2 == len(list(batches(np.zeros(10), np.zeros(10), 4)))
    assert num_batches(10, 4, drop_remainder=False) == 3
    with pytest.raises(TypeError):
        num_batches(10, 4, False)  # keyword only, as in batches
    with pytest.raises(ValueError, match=r"num_batches: batch_size must be a positive integer"):
        num_batches(10, 0)
