"""Users' own files for classification: arrays (``.npz``), tables (``.csv``), folders of images
and folders of text files.

Every loader returns a :class:`~fnn.data.digits.Split` of numpy arrays: features ``float32``
(token ids ``int32`` for text), labels ``int32[N]`` class ids. A file that cannot be used is a
one-line ``ValueError`` naming the file (and the line, column or key) with what was expected and
what was found; a missing path is a ``FileNotFoundError`` (and a folder given for a file an
``IsADirectoryError``, a file for a folder a ``NotADirectoryError``).

Folders hold one subfolder per class: the class names are the sorted names of the subfolders
(hidden ones, starting with ``.``, are ignored) and a class id is the index of its name. The
examples of a class are the files directly in its subfolder, in sorted order of their names.

**The test split.** With ``test_path`` the test set is that file or folder, in its order. Without
it a fraction of the examples (``test_fraction``, 0.2 by default) is held out, fixed and
stratified, with no dependence on any training seed: for each class, its examples (in file or
row order) are permuted by a fresh ``np.random.default_rng(0)`` and the first
``round(test_fraction * count)`` (Python's ``round``, half to even) of them are the test
examples, at least 1 and at most ``count - 1`` when the class has 2 or more examples, so that
every class is in both parts; a class of 1 example stays in training. Both parts keep the
original order. The same files therefore always give the same split, and adding a class does
not move the examples of another.

**Text.** :func:`load_text_folder` encodes characters with a :class:`~fnn.data.text.Vocab` of
the training texts (or the one given) and shifts its ids by one: id ``0`` is padding, the
character ``vocab.chars[i]`` is id ``i + 1`` and a character outside the vocabulary (seen only
in test texts, or in any text with a given ``vocab``) is the reserved id ``vocab.size + 1``, so an
embedding needs ``vocab.size + 2`` rows (:func:`num_text_ids`). Each text keeps its first
``seq_len`` characters and is padded with ``0`` at the end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from typing import Callable, Sequence

import numpy as np

from fnn.data.digits import Split
from fnn.data.text import Vocab, _code_points, read_text_file

DEFAULT_TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEXT_SUFFIXES = (".txt",)
# part of every cache key: a change to how images are decoded must not reuse old entries
_CACHE_FORMAT = 1
PathLike = str | os.PathLike
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# ------------------------------------------------------------------------------------------------
# arrays and tables


def load_arrays(path: PathLike, *, test_path: PathLike | None = None,
                test_fraction: float | None = None) -> Split:
    """The examples of an ``.npz`` archive (``np.savez``) with keys ``x`` and ``y``.

    ``x`` is any numeric ``[N, ...]`` array, returned as ``float32[N, ...]``; ``y`` holds
    integer labels ``[N]`` (not floats, even whole ones), returned as ``int32[N]``. The
    archive is read without unpickling. The test set is ``test_path`` (another such archive,
    with the same ``x.shape[1:]``) or a fixed stratified fraction (see the module docstring).
    """
    _check_split_args("load_arrays", test_path, test_fraction)
    x, y = _read_npz(path)
    if test_path is None:
        return _split("load_arrays", path, x, y, test_fraction)
    x_test, y_test = _read_npz(test_path)
    if x_test.shape[1:] != x.shape[1:]:
        raise ValueError(f"load_arrays: the examples of {os.fspath(test_path)!r} must have the "
                         f"shape of those of {os.fspath(path)!r}, {x.shape[1:]}, got "
                         f"{x_test.shape[1:]}")
    return Split(x, y, x_test, y_test)


def load_csv(path: PathLike, label_column: str | int, *, test_path: PathLike | None = None,
             test_fraction: float | None = None, header: bool = True) -> Split:
    """The rows of a UTF-8 CSV file: the ``label_column`` (a name from the header row, or an
    index, negative from the end) holds integer labels ``int32[N]``, every other column is a
    numeric feature: ``x: float32[N, F]`` in the order of the columns.

    Without a ``header`` every line is a row and ``label_column`` must be an index. Blank lines
    are skipped. The test set is ``test_path`` (a CSV with the same columns) or a fixed
    stratified fraction (see the module docstring).
    """
    _check_split_args("load_csv", test_path, test_fraction)
    columns, x, y = _read_csv(path, label_column, header)
    if test_path is None:
        return _split("load_csv", path, x, y, test_fraction)
    test_columns, x_test, y_test = _read_csv(test_path, label_column, header)
    if test_columns != columns:
        raise ValueError(f"load_csv: {os.fspath(test_path)!r} must have the columns of "
                         f"{os.fspath(path)!r}, {columns}, got {test_columns}")
    return Split(x, y, x_test, y_test)


def _read_npz(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    name = _check_file("load_arrays", path)
    expected = "expected an .npz archive (np.savez) with keys 'x' and 'y'"
    try:
        archive = np.load(name, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"load_arrays: {name!r} cannot be read: {expected}, got a file numpy "
                         f"cannot load ({_one_line(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"load_arrays: {name!r}: {expected}, got a single .npy array")
    with archive:
        if "x" not in archive.files or "y" not in archive.files:
            raise ValueError(f"load_arrays: {name!r}: {expected}, got the keys "
                             f"{sorted(archive.files)}")
        try:
            x, y = archive["x"], archive["y"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"load_arrays: {name!r}: expected numeric arrays 'x' and 'y', got "
                             f"an array numpy cannot load without unpickling or a damaged "
                             f"archive ({_one_line(e)})") from None
    if x.dtype.kind not in "biuf":
        raise ValueError(f"load_arrays: {name!r} key 'x' must be numeric, got {x.dtype}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"load_arrays: {name!r} key 'y': labels must be integers, got {y.dtype}")
    if x.ndim == 0 or y.ndim != 1:
        raise ValueError(f"load_arrays: {name!r} must hold x: [N, ...] and y: [N], got x: "
                         f"{list(x.shape)} and y: {list(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"load_arrays: {name!r} must hold as many labels as examples, got "
                         f"{len(x)} examples (x) and {len(y)} labels (y)")
    if len(y) == 0:
        raise ValueError(f"load_arrays: {name!r} must hold at least one example, got 0")
    if y.min() < 0 or y.max() > np.iinfo(np.int32).max:
        i = int(np.argmin(y)) if y.min() < 0 else int(np.argmax(y))
        raise ValueError(f"load_arrays: {name!r} key 'y': labels must be class ids in "
                         f"[0, 2**31), got {y[i]} at index {i}")
    with np.errstate(over="ignore"):  # a float64 beyond the float32 range: inf, caught here
        x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"load_arrays: {name!r} key 'x' must be finite (in float32), got "
                         f"{int(bad.sum())} non-finite value(s), the first {x[first]} at index "
                         f"{first}")
    return x, y.astype(np.int32)


def _read_csv(path: PathLike, label_column: str | int,
              header: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    name = _check_file("load_csv", path)
    with open(name, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a spreadsheet's byte-order mark
    except UnicodeDecodeError as e:
        raise ValueError(f"load_csv: {name!r} is not UTF-8 text: byte {data[e.start]:#04x} at "
                         f"offset {e.start} ({e.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as e:
        raise ValueError(f"load_csv: {name!r} line {reader.line_num}: expected CSV, got "
                         f"{_one_line(e)}") from None
    if not rows:
        raise ValueError(f"load_csv: {name!r} is empty: expected "
                         + ("a header row and rows" if header else "rows"))
    if header:
        columns = [c.strip() for c in rows[0][1]]
        rows = rows[1:]
        if not rows:
            raise ValueError(f"load_csv: {name!r} has a header row but no rows")
    else:
        columns = [f"column {i}" for i in range(len(rows[0][1]))]
    label = _label_index(name, label_column, columns, header)
    if len(columns) < 2:
        raise ValueError(f"load_csv: {name!r} must have a label column and at least one "
                         f"feature column, got the columns {columns}")
    x = np.empty((len(rows), len(columns) - 1), np.float32)
    y = np.empty(len(rows), np.int32)
    for r, (line, row) in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"load_csv: {name!r} line {line}: expected {len(columns)} columns "
                             f"{'as in the header' if header else 'as in the first row'}, got "
                             f"{len(row)}")
        y[r] = _csv_label(name, line, columns[label], row[label])
        features = row[:label] + row[label + 1:]
        for c, (column, value) in enumerate(zip(columns[:label] + columns[label + 1:], features)):
            x[r, c] = _csv_number(name, line, column, value)
    return columns, x, y


def _label_index(name: str, label_column: str | int, columns: list[str], header: bool) -> int:
    if isinstance(label_column, str):
        if not header:
            raise ValueError(f"load_csv: without a header label_column must be a column index, "
                             f"got {label_column!r}")
        if label_column not in columns:
            raise ValueError(f"load_csv: {name!r} has no column {label_column!r}; its columns "
                             f"are {columns}")
        return columns.index(label_column)
    if isinstance(label_column, bool) or not isinstance(label_column, (int, np.integer)):
        raise TypeError(f"load_csv: label_column must be a column name or index, got "
                        f"{type(label_column).__name__}")
    if not -len(columns) <= label_column < len(columns):
        raise ValueError(f"load_csv: {name!r} has no column {label_column}; it has "
                         f"{len(columns)} columns: {columns}")
    return int(label_column) % len(columns)


def _csv_label(name: str, line: int, column: str, value: str) -> int:
    try:
        label = int(value)
    except ValueError:
        label = None
    if label is None or not 0 <= label <= np.iinfo(np.int32).max:
        raise ValueError(f"load_csv: {name!r} line {line}, column {column!r}: labels must be "
                         f"integer class ids >= 0, got {value!r}")
    return label


def _csv_number(name: str, line: int, column: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not abs(number) <= _FLOAT32_MAX:  # also false for nan
        raise ValueError(f"load_csv: {name!r} line {line}, column {column!r}: expected a finite "
                         f"number (in float32), got {value!r}")
    return number


# ------------------------------------------------------------------------------------------------
# folders


def load_image_folder(path: PathLike, size: int | tuple[int, int], *, channels: int = 3,
                      test_path: PathLike | None = None, test_fraction: float | None = None,
                      cache_dir: PathLike | None = None) -> tuple[Split, list[str]]:
    """The images of a folder with one subfolder per class, and the class names.

    The files ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case) are decoded with Pillow,
    turned upright by their EXIF orientation, converted to RGB (``channels=3``) or grayscale
    (``channels=1``), resized to ``size`` (``height = width = size``, or ``(height, width)``)
    with bilinear resampling and scaled to [0, 1]: ``x: float32[N, height, width, channels]``.
    The test set is the folder ``test_path`` (with the same class names) or a fixed stratified
    fraction (see the module docstring).

    The decoded pixels of each folder are cached in ``cache_dir`` (default ``$FNN_CACHE_DIR``,
    else ``~/.cache/fnn/images``) under a hash of the folder's absolute path, ``size``,
    ``channels`` and every image's relative path, byte size and modification time, so a
    second call reads no image until a file is changed, added or removed.
    """
    _check_split_args("load_image_folder", test_path, test_fraction)
    height, width = _image_size(size)
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder: channels must be 1 (grayscale) or 3 (RGB), got "
                         f"{channels!r}")
    if cache_dir is None:
        cache_dir = os.environ.get("FNN_CACHE_DIR") or os.path.join("~", ".cache", "fnn", "images")
    cache_dir = os.path.expanduser(os.fspath(cache_dir))

    def read(folder):
        classes, files, y = _list_folder("load_image_folder", folder, IMAGE_SUFFIXES, "image")
        pixels = _cached_pixels(folder, files, height, width, channels, cache_dir)
        return classes, pixels.astype(np.float32) / np.float32(255), y

    return _load_folder("load_image_folder", read, path, test_path, test_fraction)


def load_text_folder(path: PathLike, *, seq_len: int, test_path: PathLike | None = None,
                     test_fraction: float | None = None,
                     vocab: Vocab | None = None) -> tuple[Split, list[str], Vocab]:
    """The texts of a folder with one subfolder per class, the class names and the vocabulary.

    Every ``.txt`` file (any case, UTF-8) is one example, encoded as in the module docstring
    (``0`` padding, ``1 + vocab id`` for a character, ``vocab.size + 1`` for an unknown one):
    ``x: int32[N, seq_len]``. The vocabulary is ``vocab`` or that of every training text. The
    test set is the folder ``test_path`` (with the same class names) or a fixed stratified
    fraction (see the module docstring).
    """
    _check_split_args("load_text_folder", test_path, test_fraction)
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise ValueError(f"load_text_folder: seq_len must be a positive integer, got "
                         f"{seq_len!r}")

    def read(folder):
        classes, files, y = _list_folder("load_text_folder", folder, TEXT_SUFFIXES, "text")
        texts = np.empty(len(files), object)
        texts[:] = [read_text_file(os.path.join(folder, f)) for f, *_ in files]
        return classes, texts, y

    split, classes = _load_folder("load_text_folder", read, path, test_path, test_fraction)
    if vocab is None:
        vocab = Vocab.from_text("".join(split.x_train))
    x_train = encode_texts(split.x_train, vocab, seq_len)
    x_test = encode_texts(split.x_test, vocab, seq_len)
    return Split(x_train, split.y_train, x_test, split.y_test), classes, vocab


def encode_texts(texts: Sequence[str], vocab: Vocab, seq_len: int) -> np.ndarray:
    """``texts -> int32[len(texts), seq_len]``, as :func:`load_text_folder` encodes them: the
    first ``seq_len`` characters, ``1 + vocab id`` each (``vocab.size + 1`` for one outside the
    vocabulary), then ``0`` (padding).

    >>> encode_texts(["hello", "oh!"], Vocab.from_text("hello"), 4).tolist()
    [[2, 1, 3, 3], [4, 2, 5, 0]]
    """
    # a last entry above every code point, so that every searchsorted index is in the table
    table = np.append(_code_points(vocab.chars), np.uint32(0x110000))
    ids = np.zeros((len(texts), seq_len), np.int32)
    for i, text in enumerate(texts):
        cps = _code_points(text[:seq_len])
        at = np.searchsorted(table, cps)
        ids[i, :len(cps)] = np.where(table[at] == cps, at + 1, vocab.size + 1)
    return ids


def num_text_ids(vocab: Vocab) -> int:
    """The number of distinct ids :func:`encode_texts` gives (an embedding's rows): padding,
    every character of ``vocab`` and the unknown character, ``vocab.size + 2``."""
    return vocab.size + 2


def _load_folder(fn: str, read: Callable, path: PathLike, test_path: PathLike | None,
                 test_fraction: float | None) -> tuple[Split, list[str]]:
    classes, x, y = read(path)
    if test_path is None:
        return _split(fn, path, x, y, test_fraction), classes
    test_classes, x_test, y_test = read(test_path)
    if test_classes != classes:
        raise ValueError(f"{fn}: the test folder {os.fspath(test_path)!r} must have the classes "
                         f"of {os.fspath(path)!r}, {classes}, got {test_classes}")
    return Split(x, y, x_test, y_test), classes


def _list_folder(fn: str, folder: PathLike, suffixes: tuple[str, ...],
                 kind: str) -> tuple[list[str], list[tuple], np.ndarray]:
    """The class names, ``(relative path, bytes, mtime_ns, ctime_ns, inode)`` of every example
    file (what the image cache is keyed by), and the
    labels ``int32[N]``; the examples of class 0 first, each class in sorted file order."""
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"{fn}: no such folder {folder!r}")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{fn}: {folder!r} is a file, expected a folder with one "
                                 f"subfolder per class")
    classes = sorted(e.name for e in os.scandir(folder)
                     if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{fn}: {folder!r} must have a subfolder per class, at least 2, got "
                         + (f"only {classes}" if classes else "no subfolders"))
    files, labels = [], []
    for label, name in enumerate(classes):
        entries = sorted((e for e in os.scandir(os.path.join(folder, name))
                          if e.is_file() and not e.name.startswith(".")
                          and e.name.lower().endswith(suffixes)), key=lambda e: e.name)
        if not entries:
            raise ValueError(f"{fn}: the class folder {os.path.join(folder, name)!r} has no "
                             f"{kind} files ({', '.join(suffixes)})")
        for e in entries:
            stat = e.stat()
            # ctime and inode too: a copy that keeps the mtime (cp -p, rsync -a) changes them
            files.append((os.path.join(name, e.name), stat.st_size, stat.st_mtime_ns,
                          stat.st_ctime_ns, stat.st_ino))
            labels.append(label)
    return classes, files, np.asarray(labels, np.int32)


def _image_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        hw = (size, size)
    else:
        hw = tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(hw) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                               and s > 0 for s in hw):
        raise ValueError(f"load_image_folder: size must be a positive integer or (height, "
                         f"width), got {size!r}")
    return int(hw[0]), int(hw[1])


def _cached_pixels(folder: PathLike, files: list[tuple], height: int, width: int,
                   channels: int, cache_dir: str) -> np.ndarray:
    """``uint8[N, height, width, channels]``, from the cache when its key matches."""
    folder = os.path.abspath(os.fspath(folder))
    key = json.dumps([_CACHE_FORMAT, folder, height, width, channels, files])
    cache = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest() + ".npz")
    shape = (len(files), height, width, channels)
    try:
        with np.load(cache, allow_pickle=False) as archive:
            pixels = archive["pixels"]
        if pixels.shape == shape and pixels.dtype == np.uint8:
            return pixels
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # no entry yet, or an unusable one: decode again and replace it
    pixels = np.stack([_decode_image(os.path.join(folder, f[0]), height, width, channels)
                       for f in files])
    try:
        _write_cache(cache_dir, cache, pixels)
    except OSError as e:  # the cache only saves time: go on without it
        warnings.warn(f"load_image_folder: the decoded images are not cached in {cache_dir!r} "
                      f"({e}); they will be decoded again next time", stacklevel=3)
    return pixels


def _write_cache(cache_dir: str, cache: str, pixels: np.ndarray) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    # a reader in another process sees the old entry or the whole new one, never half of it
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, pixels=pixels)
        os.replace(tmp, cache)
    except BaseException:
        os.unlink(tmp)
        raise


def _decode_image(file: str, height: int, width: int, channels: int) -> np.ndarray:
    """``uint8[height, width, channels]``: the image upright, converted and resized."""
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_image_folder decodes images with Pillow: pip install Pillow") from e
    try:
        with Image.open(file) as image:
            image = ImageOps.exif_transpose(image).convert("RGB" if channels == 3 else "L")
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"load_image_folder: {file!r} is not a readable image: "
                         f"{_one_line(e)}") from None
    return np.asarray(image, np.uint8).reshape(height, width, channels)


# ------------------------------------------------------------------------------------------------
# the test split


def _check_split_args(fn: str, test_path: PathLike | None, test_fraction: float | None) -> None:
    if test_path is not None and test_fraction is not None:
        raise ValueError(f"{fn}: give test_path or test_fraction, not both")
    if test_fraction is not None and (isinstance(test_fraction, bool)
                                      or not isinstance(test_fraction, (int, float, np.floating))
                                      or not 0 < test_fraction < 1):
        raise ValueError(f"{fn}: test_fraction must be a number in (0, 1), got "
                         f"{test_fraction!r}")


def _held_out_indices(y: np.ndarray, test_fraction: float) -> np.ndarray:
    """The sorted indices of the test examples among labels ``y: int[N]``: the fixed stratified
    split of the module docstring (a class of ``count >= 2`` examples gives
    ``min(max(round(test_fraction * count), 1), count - 1)`` of them).

    >>> _held_out_indices(np.array([0, 0, 0, 0, 0, 1, 1, 2]), 0.2).tolist()
    [2, 5]
    """
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) >= 2:
            count = min(max(round(test_fraction * len(members)), 1), len(members) - 1)
            test.append(np.random.default_rng(0).permutation(members)[:count])
    return np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)


def _split(fn: str, path: PathLike, x: np.ndarray, y: np.ndarray,
           test_fraction: float | None) -> Split:
    fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    test = np.zeros(len(y), bool)
    test[_held_out_indices(y, fraction)] = True
    if not test.any():
        raise ValueError(f"{fn}: no test examples can be held out of {os.fspath(path)!r}: "
                         f"expected a class with at least 2 examples, got {len(y)} example(s) "
                         f"of {len(np.unique(y))} class(es); give a test_path")
    return Split(x[~test], y[~test], x[test], y[test])


def _check_file(fn: str, path: PathLike) -> str:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"{fn}: no such file {name!r}")
    if os.path.isdir(name):
        raise IsADirectoryError(f"{fn}: {name!r} is a directory, expected a file")
    return name


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
