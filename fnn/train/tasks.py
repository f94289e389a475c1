"""What a training run trains on: a task turns a step number into that step's batch and knows
how to evaluate a model on its held-out data.

Batches are a pure function of ``(seed, step)``, never of a live iterator, so a run resumed from
a checkpoint at step ``s`` sees exactly the batches the uninterrupted run would have seen after
``s``: the data iterator's position *is* the step.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Mapping, NamedTuple

import jax
import numpy as np

from fnn.data.batching import batches, epoch_order, num_batches
from fnn.data.digits import Split
from fnn.data.text import TextSplit, num_sequence_batches, window_starts, windows
from fnn.losses import accuracy, bits_per_char

Metric = Callable[[jax.Array, jax.Array], jax.Array]


class Task(NamedTuple):
    """A training task.

    - ``example``: one training batch's inputs (shape and dtype), to initialise the model.
    - ``steps_per_epoch``: whole batches in one pass over the training data.
    - ``batch(step)``: the training batch ``(x, y)`` of global step ``step`` (from 0); epoch
      ``step // steps_per_epoch + 1``, shuffled from ``(seed, epoch)``.
    - ``eval_batches()``: the held-out data as ``(x, y)`` batches; metrics are averaged over
      them weighted by batch size.
    - ``eval_name``: the prefix of held-out metrics in the history (``"test"``, ``"valid"``).
    - ``metrics``: metric functions ``(outputs, targets) -> scalar`` besides the loss.
    - ``num_classes``: the number of classes the targets use (the largest label + 1, checked on
      the host), which the model's output must have at least; ``None`` for other targets.
    - ``data_range``: the smallest and the largest value of the training inputs (floating
      inputs), the data's own scale, which a generative model's samples are given in; ``None``
      for token ids.
    """

    example: np.ndarray
    steps_per_epoch: int
    batch: Callable[[int], tuple[np.ndarray, np.ndarray]]
    eval_batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
    eval_name: str
    metrics: Mapping[str, Metric]
    num_classes: int | None = None
    data_range: tuple[float, float] | None = None


def _check_size(caller: str, arg: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{caller}: {arg} must be a positive int, got {value!r}")


def _class_count(caller: str, *labels: tuple[str, np.ndarray]) -> int:
    """The number of classes integer labels use (the largest + 1); negative or non-integer
    labels are an error naming their array."""
    top = 0
    for name, y in labels:
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{caller}: {name} must hold integer class ids, got {y.dtype}")
        if y.size and y.min() < 0:
            raise ValueError(f"{caller}: {name} must hold class ids >= 0, got {int(y.min())} "
                             f"(at index {int(np.argmin(y))})")
        top = max(top, int(y.max()) + 1 if y.size else 0)
    return top


def _check_split(caller: str, data: Split) -> None:
    for x, y, split in ((data.x_train, data.y_train, "train"), (data.x_test, data.y_test, "test")):
        if len(x) != len(y):
            raise ValueError(f"{caller}: x_{split} and y_{split} must have the same length, got "
                             f"{len(x)} and {len(y)}")
    if len(data.x_test) == 0:
        raise ValueError(f"{caller}: the test split is empty")


def _epoch_of(step: int, steps_per_epoch: int) -> tuple[int, int]:
    """``(epoch from 1, batch index within the epoch)`` of a global step."""
    return step // steps_per_epoch + 1, step % steps_per_epoch


def classification_task(data: Split, batch_size: int, *, seed: int = 0,
                        eval_batch_size: int = 512,
                        metrics: Mapping[str, Metric] | None = None,
                        _caller: str | None = None) -> Task:
    """Shuffled mini-batches of ``data.x_train``; evaluation on ``data.x_test`` (``"test"``).

    The batches are those of :func:`fnn.data.batches` with ``seed`` and ``epoch``, in order.
    The labels (``y_train``, ``y_test``) are integer class ids >= 0, checked here, on the host;
    :func:`fnn.train.train` checks that the model's output has a column for each class.
    """
    caller = _caller or "classification_task"
    _check_size(caller, "batch_size", batch_size)
    _check_size(caller, "eval_batch_size", eval_batch_size)
    _check_split(caller, data)
    num_classes = _class_count(caller, ("y_train", data.y_train), ("y_test", data.y_test))
    steps = num_batches(len(data.x_train), batch_size, drop_remainder=True)
    if steps == 0:
        raise ValueError(f"{caller}: batch_size {batch_size} is larger than the training set "
                         f"({len(data.x_train)} examples)")
    order = functools.lru_cache(maxsize=2)(
        lambda epoch: epoch_order(len(data.x_train), seed, epoch))

    def batch(step: int):
        epoch, i = _epoch_of(step, steps)
        index = order(epoch)[i * batch_size:(i + 1) * batch_size]
        return data.x_train[index], data.y_train[index]

    x = np.asarray(data.x_train)
    data_range = ((float(x.min()), float(x.max())) if np.issubdtype(x.dtype, np.floating)
                  and x.size else None)
    return Task(data.x_train[:batch_size], steps, batch,
                lambda: batches(data.x_test, data.y_test, eval_batch_size, drop_remainder=False),
                "test", {"accuracy": accuracy} if metrics is None else metrics, num_classes,
                data_range)


def language_model_task(text: TextSplit, batch_size: int, seq_len: int, *, seed: int = 0,
                        eval_batch_size: int | None = None) -> Task:
    """Next-character prediction: windows ``int32[batch_size, seq_len]`` at random starts of the
    training ids (drawn from ``(seed, epoch)``, as :func:`fnn.data.sequence_batches` with a
    seed); evaluation on consecutive windows of the validation ids (``"valid"``), reporting
    ``bits_per_char`` and ``accuracy``. An epoch has as many batches as non-overlapping windows
    fit the training text. The ids must lie in the vocabulary (``[0, text.vocab.size)``), checked
    here: an id outside a model's embedding table would give NaN logits."""
    caller = "language_model_task"
    for arg, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        _check_size(caller, arg, value)
    if eval_batch_size is not None:
        _check_size(caller, "eval_batch_size", eval_batch_size)
    used = _class_count(caller, ("text.train", text.train), ("text.valid", text.valid))
    if used > text.vocab.size:
        raise ValueError(f"{caller}: the ids go up to {used - 1}, outside the vocabulary of "
                         f"{text.vocab.size} characters")
    steps = num_sequence_batches(len(text.train), batch_size, seq_len)
    if steps == 0:
        raise ValueError(f"language_model_task: {len(text.train)} training characters are too "
                         f"few for one batch of {batch_size} windows of {seq_len} (+1)")
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    eval_windows = num_sequence_batches(len(text.valid), 1, seq_len)
    if eval_windows == 0:
        raise ValueError(f"language_model_task: {len(text.valid)} validation characters are "
                         f"too few for one window of seq_len {seq_len} (+1)")
    train = np.asarray(text.train, np.int32)
    starts = functools.lru_cache(maxsize=2)(
        lambda epoch: window_starts(len(train), steps * batch_size, seq_len, seed, epoch))
    valid = np.asarray(text.valid, np.int32)

    def batch(step: int):
        epoch, i = _epoch_of(step, steps)
        return windows(train, starts(epoch)[i * batch_size:(i + 1) * batch_size], seq_len)

    def eval_batches():
        # every whole validation window once, consecutive, in batches of up to eval_batch_size
        for first in range(0, eval_windows, eval_batch_size):
            count = min(eval_batch_size, eval_windows - first)
            yield windows(valid, (first + np.arange(count)) * seq_len, seq_len)

    example = train[:seq_len * batch_size].reshape(batch_size, seq_len)
    return Task(example, steps, batch, eval_batches, "valid",
                {"bits_per_char": bits_per_char, "accuracy": accuracy}, text.vocab.size)
