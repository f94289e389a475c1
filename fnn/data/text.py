"""Character-level text for language models, with no download.

``load_text()`` reads the English text that ships with every CPython: the help topics of
``pydoc_data.topics.topics`` (the text of ``help("if")``, ``help("FORMATTING")``, ...), the
dict's values joined in sorted key order (about 465,000 characters, ~100 distinct ones).
``load_text(path)`` reads a UTF-8 text file instead.

The split is fixed and needs no random numbers: the **last 10%** of the characters are the
validation text, the first 90% the training text. The vocabulary is built from the whole text
(training and validation), sorted by code point, so ids are stable for a given text.

Language-model batches are windows of the id sequence: ``sequence_batches`` yields
``(x, y)`` pairs ``int32[batch, seq_len]`` with ``y[:, t] == x[:, t + 1]`` (the next
character), either consecutive non-overlapping windows or, with a ``seed``, windows at random
starts drawn from ``(seed, epoch)``.
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple

import numpy as np

VALID_FRACTION = 0.1


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class Vocab(NamedTuple):
    """A character vocabulary: id ``i`` is the character ``chars[i]`` (sorted by code point).

    >>> v = Vocab.from_text("hello")
    >>> v.chars, v.encode("hell").tolist(), v.decode([3, 1])
    ('ehlo', [1, 0, 2, 2], 'oh')
    """

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """The vocabulary of every distinct character of ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``text -> int32[len(text)]``; a character outside the vocabulary is a ValueError."""
        table = _code_points(self.chars)
        cps = _code_points(text)
        ids = np.searchsorted(table, cps)
        ids_clipped = np.minimum(ids, len(table) - 1)
        bad = (ids >= len(table)) | (table[ids_clipped] != cps)
        if bad.any():
            unknown = sorted({chr(c) for c in cps[bad]})
            first = int(np.argmax(bad))
            raise ValueError(f"Vocab.encode: {len(unknown)} character(s) not in the vocabulary "
                             f"of {len(table)} characters: {unknown[:10]!r} (first at position "
                             f"{first})")
        return ids_clipped.astype(np.int32)

    def decode(self, ids) -> str:
        """``int[...] -> str``: the characters of the ids in order (flattened)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0
                         or ids.max() >= len(self.chars)):
            raise ValueError(f"Vocab.decode: ids must be integers in [0, {len(self.chars)}), got "
                             f"{ids.dtype} in [{ids.min()}, {ids.max()}]")
        return "".join(self.chars[i] for i in ids.tolist())


class TextSplit(NamedTuple):
    train: np.ndarray  # int32[n_train]
    valid: np.ndarray  # int32[n_valid], the last 10% of the text
    vocab: Vocab


def default_corpus() -> str:
    """The help topics of CPython (``pydoc_data.topics.topics``), joined in sorted key order."""
    from pydoc_data.topics import topics
    return "".join(topics[k] for k in sorted(topics))


def load_text(path: str | os.PathLike | None = None) -> TextSplit:
    """The character ids of a text, split into training (first 90%) and validation (last 10%).

    With no ``path`` the text is :func:`default_corpus`; otherwise the UTF-8 file at ``path``.
    """
    text = default_corpus() if path is None else read_text_file(path)
    if len(text) < 2:
        raise ValueError(f"load_text: the text must have at least 2 characters, got "
                         f"{len(text)}" + (f" in {os.fspath(path)!r}" if path else ""))
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    n_valid = max(1, int(round(len(ids) * VALID_FRACTION)))
    return TextSplit(ids[:-n_valid], ids[-n_valid:], vocab)


def read_text_file(path: str | os.PathLike) -> str:
    """The UTF-8 text of the file at ``path``; a directory, a missing file or bytes that are not
    UTF-8 raise an error naming the file (and the offset of the first bad byte)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"load_text: {path!r} is a directory, not a text file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"load_text: {path!r} is not UTF-8 text: byte {data[e.start]:#04x} at "
                         f"offset {e.start} ({e.reason})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() does


def _check(ids: np.ndarray, batch_size: int, seq_len: int) -> None:
    for arg, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"sequence_batches: {arg} must be a positive integer, got {v!r}")
    if np.ndim(ids) != 1:
        raise ValueError(f"sequence_batches: ids must be 1-D, got shape {np.shape(ids)}")


def num_sequence_batches(n: int, batch_size: int, seq_len: int) -> int:
    """How many batches :func:`sequence_batches` yields for ``n`` ids: the number of
    non-overlapping windows of ``seq_len + 1`` ids sharing their last id with the next
    window's first, ``(n - 1) // seq_len``, in whole batches."""
    return max(0, (n - 1) // seq_len) // batch_size


def window_starts(n: int, count: int, seq_len: int, seed: int, epoch: int) -> np.ndarray:
    """``count`` random window starts in ``[0, n - seq_len)`` drawn from ``(seed, epoch)``
    alone (each window holds ``seq_len + 1`` ids: inputs and next-id targets)."""
    return np.random.default_rng([seed, epoch]).integers(0, n - seq_len, size=count)


def sequence_batches(ids: np.ndarray, batch_size: int, seq_len: int, *, seed: int | None = None,
                     epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x, y)``, each ``int32[batch_size, seq_len]``, with ``y = ids[s + 1: s + 1 +
    seq_len]`` for ``x = ids[s: s + seq_len]``: the target is the next id.

    Without a ``seed`` the windows are consecutive (``s = 0, seq_len, 2 * seq_len, ...``, in
    order, batch after batch); with one, every window starts at a random ``s`` drawn from
    ``(seed, epoch)`` (the same number of batches, :func:`num_sequence_batches`). The last,
    incomplete batch is dropped, so every batch has one shape.
    """
    _check(ids, batch_size, seq_len)
    ids = np.asarray(ids, dtype=np.int32)
    count = num_sequence_batches(len(ids), batch_size, seq_len)
    if count == 0:
        raise ValueError(f"sequence_batches: {len(ids)} ids are too few for one batch of "
                         f"{batch_size} windows of seq_len {seq_len} (+1 for the target)")
    if seed is None:
        starts = np.arange(count * batch_size) * seq_len
    else:
        starts = window_starts(len(ids), count * batch_size, seq_len, seed, epoch)
    for b in range(count):
        yield windows(ids, starts[b * batch_size:(b + 1) * batch_size], seq_len)


def windows(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``, each ``[len(starts), seq_len]``: ``x[i] = ids[s: s + seq_len]`` and
    ``y[i] = ids[s + 1: s + 1 + seq_len]`` for ``s = starts[i]``."""
    window = ids[np.asarray(starts)[:, None] + np.arange(seq_len + 1)]
    return window[:, :-1], window[:, 1:]
