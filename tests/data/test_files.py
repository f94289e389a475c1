"""Users' own files: .npz arrays, CSV tables, image folders and text folders, the fixed
stratified test split, the image cache and the one-line errors for every bad file."""

import contextlib
import os

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from fnn.data import (Split, Vocab, encode_texts, load_arrays, load_csv, load_image_folder,
                      load_text_folder, num_text_ids)


@contextlib.contextmanager
def one_line_error(exc, match):
    with pytest.raises(exc, match=match) as info:
        yield
    assert "\n" not in str(info.value)


def expected_test_indices(y, fraction):
    """The split as the module docstring states it, written out per class."""
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) >= 2:
            count = min(max(round(fraction * len(members)), 1), len(members) - 1)
            test.extend(np.random.default_rng(0).permutation(members)[:count])
    return np.sort(np.asarray(test, np.int64))


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------------
# the split


def test_arrays_roundtrip_and_fixed_stratified_split(tmp_path):
    # x[i] holds i everywhere, so every example can be traced back to its row
    y = np.array([0, 1] * 10 + [2] * 7 + [3], np.int64)
    x = np.broadcast_to(np.arange(len(y))[:, None, None], (len(y), 2, 3)).astype(np.int16)
    path = save_npz(tmp_path / "data.npz", x=x, y=y)

    np.random.seed(123)  # the split depends on no global or training seed
    split = load_arrays(path)
    assert isinstance(split, Split)
    assert split.x_train.dtype == split.x_test.dtype == np.float32
    assert split.y_train.dtype == split.y_test.dtype == np.int32
    assert split.x_train.shape[1:] == split.x_test.shape[1:] == (2, 3)
    test = split.x_test[:, 0, 0].astype(int)
    train = split.x_train[:, 0, 0].astype(int)
    np.testing.assert_array_equal(test, expected_test_indices(y, 0.2))
    # 10, 10, 7 and 1 examples: 2, 2, 1 (round(1.4)) and 0 held out, both parts in row order
    assert np.bincount(split.y_test, minlength=4).tolist() == [2, 2, 1, 0]
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()
    np.testing.assert_array_equal(split.x_train, x[train])
    np.testing.assert_array_equal(split.y_train, y[train])
    np.testing.assert_array_equal(split.y_test, y[test])

    np.random.seed(7)
    _ = np.random.default_rng().random(10)
    again = load_arrays(path)
    for a, b in zip(split, again):
        np.testing.assert_array_equal(a, b)

    half = load_arrays(path, test_fraction=0.5)
    np.testing.assert_array_equal(half.x_test[:, 0, 0].astype(int),
                                  expected_test_indices(y, 0.5))
    # 10 -> 5, 7 -> round(3.5) = 4 (half to even), 1 -> 0
    assert np.bincount(half.y_test, minlength=4).tolist() == [5, 5, 4, 0]


def test_split_edge_cases(tmp_path):
    x = np.arange(6, dtype=np.float32)[:, None]
    # a class of 2 keeps 1 for training even at a large fraction; at a small one it gives 1
    y = np.array([0, 0, 1, 1, 1, 2])
    path = save_npz(tmp_path / "small.npz", x=x, y=y)
    split = load_arrays(path, test_fraction=0.9)
    assert np.bincount(split.y_train, minlength=3).tolist() == [1, 1, 1]
    assert np.bincount(split.y_test, minlength=3).tolist() == [1, 2, 0]
    split = load_arrays(path, test_fraction=0.01)
    assert np.bincount(split.y_test, minlength=3).tolist() == [1, 1, 0]

    singles = save_npz(tmp_path / "singles.npz", x=x[:3], y=np.array([0, 1, 2]))
    with one_line_error(ValueError, r"load_arrays: no test examples can be held out of "
                                    r"'.*singles.npz': expected a class with at least 2 "
                                    r"examples, got 3 example\(s\) of 3 class\(es\)"):
        load_arrays(singles)
    for fraction in (0, 1, 1.5, -0.1, True, "0.2"):
        with one_line_error(ValueError, r"load_arrays: test_fraction must be a number in "
                                        r"\(0, 1\), got"):
            load_arrays(path, test_fraction=fraction)
    with one_line_error(ValueError, "give test_path or test_fraction, not both"):
        load_arrays(path, test_path=path, test_fraction=0.2)


def test_arrays_test_path(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3) / 4
    train = save_npz(tmp_path / "train.npz", x=x, y=np.array([0, 1, 0, 1], np.uint8))
    test = save_npz(tmp_path / "test.npz", x=x[:2] + 100, y=np.array([1, 0]))
    split = load_arrays(train, test_path=test)
    np.testing.assert_array_equal(split.x_train, x.astype(np.float32))
    np.testing.assert_array_equal(split.y_train, [0, 1, 0, 1])
    np.testing.assert_array_equal(split.x_test, (x[:2] + 100).astype(np.float32))
    np.testing.assert_array_equal(split.y_test, [1, 0])
    other = save_npz(tmp_path / "other.npz", x=np.zeros((2, 4)), y=np.array([0, 1]))
    with one_line_error(ValueError, r"load_arrays: the examples of '.*other.npz' must have the "
                                    r"shape of those of '.*train.npz', \(3,\), got \(4,\)"):
        load_arrays(train, test_path=other)


def test_arrays_errors(tmp_path):
    x, y = np.zeros((3, 2)), np.array([0, 1, 1])
    with one_line_error(FileNotFoundError, r"load_arrays: no such file '.*missing.npz'"):
        load_arrays(tmp_path / "missing.npz")
    with one_line_error(IsADirectoryError, r"load_arrays: '.*' is a directory, expected a file"):
        load_arrays(tmp_path)
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    with one_line_error(ValueError, r"load_arrays: '.*text.npz' cannot be read: expected an "
                                    r"\.npz archive \(np\.savez\) with keys 'x' and 'y', got a "
                                    r"file numpy cannot load"):
        load_arrays(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", x)
    with one_line_error(ValueError, r"'.*single.npy': expected an \.npz archive .*, got a single "
                                    r"\.npy array"):
        load_arrays(tmp_path / "single.npy")
    with one_line_error(ValueError, r"'.*keys.npz': expected an \.npz archive \(np\.savez\) "
                                    r"with keys 'x' and 'y', got the keys \['features', 'y'\]"):
        load_arrays(save_npz(tmp_path / "keys.npz", features=x, y=y))
    # an object array needs unpickling, which load_arrays never does
    with one_line_error(ValueError, r"'.*pickle.npz': expected numeric arrays 'x' and 'y', got "
                                    r"an array numpy cannot load without unpickling"):
        load_arrays(save_npz(tmp_path / "pickle.npz", x=np.array([{}, 1, 2], object), y=y))
    with one_line_error(ValueError, r"'.*str.npz' key 'x' must be numeric, got <U1"):
        load_arrays(save_npz(tmp_path / "str.npz", x=np.array(["a", "b", "c"]), y=y))
    with one_line_error(ValueError, r"^load_arrays: '.*float.npz' key 'y': labels must be "
                                    r"integers, got float64$"):
        load_arrays(save_npz(tmp_path / "float.npz", x=x, y=np.array([0.0, 1.0, 1.0])))
    with one_line_error(ValueError, r"'.*neg.npz' key 'y': labels must be class ids in "
                                    r"\[0, 2\*\*31\), got -1 at index 2"):
        load_arrays(save_npz(tmp_path / "neg.npz", x=x, y=np.array([0, 1, -1])))
    with one_line_error(ValueError, r"'.*len.npz' must hold as many labels as examples, got 3 "
                                    r"examples \(x\) and 2 labels \(y\)"):
        load_arrays(save_npz(tmp_path / "len.npz", x=x, y=y[:2]))
    with one_line_error(ValueError, r"'.*2d.npz' must hold x: \[N, \.\.\.\] and y: \[N\], got "
                                    r"x: \[3, 2\] and y: \[3, 1\]"):
        load_arrays(save_npz(tmp_path / "2d.npz", x=x, y=y[:, None]))
    with one_line_error(ValueError, r"'.*empty.npz' must hold at least one example, got 0"):
        load_arrays(save_npz(tmp_path / "empty.npz", x=x[:0], y=y[:0]))
    bad = x.copy()
    bad[1, 1] = np.nan
    bad[2, 0] = 1e300  # finite in float64, inf in float32
    with one_line_error(ValueError, r"'.*nan.npz' key 'x' must be finite \(in float32\), got 2 "
                                    r"non-finite value\(s\), the first nan at index \(1, 1\)"):
        load_arrays(save_npz(tmp_path / "nan.npz", x=bad, y=y))


# ------------------------------------------------------------------------------------------------
# CSV


CSV = """a,label,b
1.5,0,-2
2.5,1,3e2

0.25, 1 ,4
-1,0,0.125
"""


def test_csv_values(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(CSV)
    x = np.array([[1.5, -2], [2.5, 300], [0.25, 4], [-1, 0.125]], np.float32)
    y = np.array([0, 1, 1, 0], np.int32)
    split = load_csv(path, "label", test_path=path)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
    np.testing.assert_array_equal(split.x_train, x)
    np.testing.assert_array_equal(split.y_train, y)
    np.testing.assert_array_equal(split.x_test, x)
    for column in (1, -2):
        np.testing.assert_array_equal(load_csv(path, column, test_path=path).x_train, x)

    split = load_csv(path, "label")  # 2 examples per class: 1 of each held out
    test = expected_test_indices(y, 0.2)
    np.testing.assert_array_equal(split.x_test, x[test])
    np.testing.assert_array_equal(split.x_train, np.delete(x, test, axis=0))
    np.testing.assert_array_equal(split.y_test, [0, 1])

    headless = tmp_path / "headless.csv"
    headless.write_text("3,1.5,0.5\r\n2,0,1\r\n3,1,1\r\n")  # the label first
    split = load_csv(headless, 0, header=False, test_path=headless)
    np.testing.assert_array_equal(split.x_train, [[1.5, 0.5], [0, 1], [1, 1]])
    np.testing.assert_array_equal(split.y_train, [3, 2, 3])

    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbflabel,a\n0,1\n1,2\n")  # as spreadsheets save UTF-8
    split = load_csv(bom, "label", test_path=bom)
    np.testing.assert_array_equal(split.x_train, [[1], [2]])
    np.testing.assert_array_equal(split.y_train, [0, 1])


def test_csv_errors(tmp_path):
    def csv_file(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    good = csv_file("good.csv", CSV)
    with one_line_error(ValueError, r"^load_csv: '.*cols.csv' line 4: expected 3 columns as in "
                                    r"the header, got 2$"):
        load_csv(csv_file("cols.csv", "a,label,b\n1,0,2\n\n1,1\n"), "label")
    with one_line_error(ValueError, r"^load_csv: '.*word.csv' line 3, column 'b': expected a "
                                    r"finite number \(in float32\), got 'abc'$"):
        load_csv(csv_file("word.csv", "a,label,b\n1,0,2\n1,1,abc\n"), "label")
    with one_line_error(ValueError, r"line 2, column 'a': expected a finite number \(in "
                                    r"float32\), got ''"):
        load_csv(csv_file("blank.csv", "a,label,b\n,0,2\n"), "label")
    with one_line_error(ValueError, r"line 2, column 'b': .* got 'nan'"):
        load_csv(csv_file("nan.csv", "a,label,b\n1,0,nan\n"), "label")
    with one_line_error(ValueError, r"line 2, column 'b': .* got '1e39'"):
        load_csv(csv_file("big.csv", "a,label,b\n1,0,1e39\n"), "label")
    with one_line_error(ValueError, r"^load_csv: '.*label.csv' line 3, column 'label': labels "
                                    r"must be integer class ids >= 0, got '1.0'$"):
        load_csv(csv_file("label.csv", "a,label,b\n1,0,2\n1,1.0,2\n"), "label")
    with one_line_error(ValueError, r"line 2, column 'label': labels must be integer class ids "
                                    r">= 0, got '-1'"):
        load_csv(csv_file("neg.csv", "a,label,b\n1,-1,2\n"), "label")
    with one_line_error(ValueError, r"^load_csv: '.*good.csv' has no column 'target'; its "
                                    r"columns are \['a', 'label', 'b'\]$"):
        load_csv(good, "target")
    with one_line_error(ValueError, r"'.*good.csv' has no column 3; it has 3 columns"):
        load_csv(good, 3)
    with one_line_error(ValueError, r"without a header label_column must be a column index, "
                                    r"got 'label'"):
        load_csv(good, "label", header=False)
    with one_line_error(ValueError, r"^load_csv: '.*empty.csv' is empty: expected a header row "
                                    r"and rows$"):
        load_csv(csv_file("empty.csv", "\n\n"), "label")
    with one_line_error(ValueError, r"'.*header.csv' has a header row but no rows"):
        load_csv(csv_file("header.csv", "a,label,b\n"), "label")
    with one_line_error(ValueError, r"must have a label column and at least one feature column, "
                                    r"got the columns \['label'\]"):
        load_csv(csv_file("alone.csv", "label\n1\n"), "label")
    other = csv_file("other.csv", "a,label,c\n1,0,2\n")
    with one_line_error(ValueError, r"'.*other.csv' must have the columns of '.*good.csv', "
                                    r"\['a', 'label', 'b'\], got \['a', 'label', 'c'\]"):
        load_csv(good, "label", test_path=other)
    (tmp_path / "latin1.csv").write_bytes("a,label\ncaf\u00e9,0\n".encode("latin-1"))
    with one_line_error(ValueError, r"'.*latin1.csv' is not UTF-8 text: byte 0xe9 at offset 11"):
        load_csv(tmp_path / "latin1.csv", "label")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "latin1.csv").read_bytes())
    with one_line_error(ValueError, r"'.*bom.csv' is not UTF-8 text: byte 0xe9 at offset 14"):
        load_csv(tmp_path / "bom.csv", "label")
    with one_line_error(ValueError, r"'.*huge.csv' line 3: expected CSV, got field larger than "
                                    r"field limit \(131072\)"):
        load_csv(csv_file("huge.csv", "a,label\n1,0\n" + "1" * 200_000 + ",1\n"), "label")
    with one_line_error(FileNotFoundError, r"load_csv: no such file '.*missing.csv'"):
        load_csv(tmp_path / "missing.csv", "label")


# ------------------------------------------------------------------------------------------------
# images

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save_image(path, colour, size, mode="RGB", **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **kwargs)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """Two classes: 3 solid blue images and 5 solid red ones, of different sizes and formats,
    with files and folders that are not examples."""
    root = tmp_path / "images"
    for i, size in enumerate([(10, 6), (7, 7), (3, 12)]):
        save_image(root / "blue" / f"b{i}.png", BLUE, size)
    for i, size in enumerate([(10, 6), (5, 9), (20, 20)]):
        save_image(root / "red" / f"r{i}.PNG", RED, size)
    save_image(root / "red" / "r3.jpg", RED, (8, 8), quality=100)
    save_image(root / "red" / "r4.JPEG", RED, (9, 4), quality=100)
    save_image(root / "red" / ".hidden.png", BLUE, (4, 4))
    save_image(root / ".thumbnails" / "t.png", BLUE, (4, 4))
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "README").write_text("not a class")
    return root


def test_image_folder(image_folder, tmp_path):
    cache = tmp_path / "cache"
    (x, y, _, _), classes = load_image_folder(image_folder, 4, cache_dir=cache,
                                              test_path=image_folder)
    assert classes == ["blue", "red"]
    assert x.dtype == np.float32 and x.shape == (8, 4, 4, 3) and y.dtype == np.int32
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1, 1, 1])
    # a solid PNG resizes to exactly its colour (b0 and r0 are 10x6); a JPEG is within the
    # loss of JPEG (r3.jpg, r4.JPEG)
    np.testing.assert_array_equal(x[:3], np.broadcast_to([0, 0, 1], (3, 4, 4, 3)))
    np.testing.assert_array_equal(x[3:6], np.broadcast_to([1, 0, 0], (3, 4, 4, 3)))
    np.testing.assert_allclose(x[6:], np.broadcast_to([1, 0, 0], (2, 4, 4, 3)), atol=0.02)

    split, _ = load_image_folder(image_folder, 4, cache_dir=cache, test_fraction=0.4)
    test = expected_test_indices(y, 0.4)  # 1 of 3 blue (round(1.2)), 2 of 5 red
    assert np.bincount(split.y_test).tolist() == [1, 2]
    np.testing.assert_array_equal(split.y_test, y[test])
    np.testing.assert_array_equal(split.x_test, x[test])
    np.testing.assert_array_equal(split.x_train, np.delete(x, test, axis=0))
    np.testing.assert_array_equal(split.y_train, np.delete(y, test))


def test_image_resize_grayscale_and_orientation(tmp_path):
    root = tmp_path / "images"
    save_image(root / "a" / "red.png", RED, (10, 6))
    save_image(root / "b" / "grey.png", (10, 100, 200), (6, 10))
    # left half black, right half white, 8 wide and 4 high
    half = Image.new("RGB", (8, 4), (0, 0, 0))
    half.paste(WHITE, (4, 0, 8, 4))
    half.save(root / "b" / "half.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the left half becomes the top half
    half.save(root / "b" / "turned.jpg", quality=100, exif=exif)
    kwargs = dict(test_path=root, cache_dir=tmp_path / "cache")

    (x, y, _, _), _ = load_image_folder(root, (2, 4), **kwargs)
    assert x.shape == (4, 2, 4, 3)
    np.testing.assert_array_equal(x[0], np.broadcast_to([1, 0, 0], (2, 4, 3)))
    # height 2, width 4: the halves are columns (the middle two mix both, as bilinear does)
    np.testing.assert_array_equal(x[2, :, 0], 0)
    np.testing.assert_array_equal(x[2, :, 3], 1)
    # bilinear: output column 1 is centred on input x = 3 and weighs the input columns 1..4 by
    # a triangle twice as wide, 1/8, 3/8, 3/8, 1/8; only column 4 is white: 255 / 8 -> 32
    np.testing.assert_array_equal(x[2, :, 1], np.float32(32) / np.float32(255))
    np.testing.assert_array_equal(x[2, :, 2], np.float32(223) / np.float32(255))
    (x, _, _, _), _ = load_image_folder(root, 4, **kwargs)
    # upright: black on top, white at the bottom, the same across each row
    assert (x[3, 0] < 0.05).all() and (x[3, 1] < 0.5).all()
    assert (x[3, 2] > 0.5).all() and (x[3, 3] > 0.95).all()

    (x, y, _, _), classes = load_image_folder(root, 4, channels=1, **kwargs)
    assert classes == ["a", "b"] and x.shape == (4, 4, 4, 1)
    # ITU-R 601-2 luma, as Pillow converts to L: 255 * 299 / 1000 and (10 * 299 + 100 * 587 +
    # 200 * 114) / 1000 = 84.49, rounded
    np.testing.assert_array_equal(x[0], np.float32(76) / np.float32(255))
    np.testing.assert_array_equal(x[1], np.float32(84) / np.float32(255))
    np.testing.assert_array_equal(y, [0, 1, 1, 1])


def test_image_cache(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, classes = load_image_folder(image_folder, 4, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1 and next(cache.iterdir()).suffix == ".npz"

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")

    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", refuse)
        again, again_classes = load_image_folder(image_folder, 4, cache_dir=cache)
        assert again_classes == classes
        for a, b in zip(first, again):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        # another size or another cache directory is another entry
        with pytest.raises(AssertionError, match="an image was decoded"):
            load_image_folder(image_folder, 5, cache_dir=cache)
        with pytest.raises(AssertionError, match="an image was decoded"):
            load_image_folder(image_folder, 4, channels=1, cache_dir=cache)
        with pytest.raises(AssertionError, match="an image was decoded"):
            load_image_folder(image_folder, 4, cache_dir=tmp_path / "elsewhere")

    touched = image_folder / "blue" / "b1.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", refuse)
        with pytest.raises(AssertionError, match="an image was decoded"):
            load_image_folder(image_folder, 4, cache_dir=cache)
    load_image_folder(image_folder, 4, cache_dir=cache)

    save_image(image_folder / "blue" / "b9.png", (0, 255, 0), (4, 4))
    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", refuse)
        with pytest.raises(AssertionError, match="an image was decoded"):
            load_image_folder(image_folder, 4, cache_dir=cache)
    split, _ = load_image_folder(image_folder, 4, cache_dir=cache, test_path=image_folder)
    np.testing.assert_array_equal(split.x_train[3], np.broadcast_to([0, 1, 0], (4, 4, 3)))
    assert len(split.y_train) == 9
    assert sorted(p.suffix for p in cache.iterdir()) == [".npz"] * 3  # no temporary files left

    monkeypatch.setenv("FNN_CACHE_DIR", str(tmp_path / "env"))
    load_image_folder(image_folder, 4)
    assert len(list((tmp_path / "env").iterdir())) == 1

    # a damaged entry is decoded again and replaced
    for entry in cache.iterdir():
        entry.write_bytes(b"damaged")
    split, _ = load_image_folder(image_folder, 4, cache_dir=cache, test_path=image_folder)
    np.testing.assert_array_equal(split.x_train[3], np.broadcast_to([0, 1, 0], (4, 4, 3)))


def test_image_test_folder(image_folder, tmp_path):
    test_root = tmp_path / "test"
    save_image(test_root / "blue" / "x.png", BLUE, (3, 3))
    save_image(test_root / "red" / "y.png", RED, (3, 3))
    save_image(test_root / "red" / "z.png", BLUE, (3, 3))
    split, classes = load_image_folder(image_folder, 2, test_path=test_root,
                                       cache_dir=tmp_path / "cache")
    assert len(split.y_train) == 8 and classes == ["blue", "red"]
    np.testing.assert_array_equal(split.y_test, [0, 1, 1])
    np.testing.assert_array_equal(split.x_test[:, 0, 0], [[0, 0, 1], [1, 0, 0], [0, 0, 1]])

    save_image(test_root / "cat" / "c.png", RED, (3, 3))
    with one_line_error(ValueError, r"^load_image_folder: the test folder '.*test' must have "
                                    r"the classes of '.*images', \['blue', 'red'\], got "
                                    r"\['blue', 'cat', 'red'\]$"):
        load_image_folder(image_folder, 2, test_path=test_root, cache_dir=tmp_path / "cache")


def test_image_errors(image_folder, tmp_path):
    cache = tmp_path / "cache"
    (image_folder / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    with one_line_error(ValueError, r"^load_image_folder: '.*red/broken.png' is not a readable "
                                    r"image: "):
        load_image_folder(image_folder, 4, cache_dir=cache)
    (image_folder / "red" / "broken.png").unlink()
    data = (image_folder / "red" / "r3.jpg").read_bytes()
    (image_folder / "red" / "r3.jpg").write_bytes(data[:len(data) // 2])  # a truncated JPEG
    with one_line_error(ValueError, r"'.*red/r3.jpg' is not a readable image: "):
        load_image_folder(image_folder, 4, cache_dir=cache)

    (image_folder / "empty").mkdir()
    (image_folder / "empty" / "notes.txt").write_text("no images")
    with one_line_error(ValueError, r"^load_image_folder: the class folder '.*images/empty' has "
                                    r"no image files \(\.png, \.jpg, \.jpeg\)$"):
        load_image_folder(image_folder, 4, cache_dir=cache)

    flat = tmp_path / "flat"
    save_image(flat / "a.png", RED, (2, 2))
    with one_line_error(ValueError, r"^load_image_folder: '.*flat' must have a subfolder per "
                                    r"class, at least 2, got no subfolders$"):
        load_image_folder(flat, 4, cache_dir=cache)
    save_image(flat / "only" / "a.png", RED, (2, 2))
    with one_line_error(ValueError, r"got only \['only'\]"):
        load_image_folder(flat, 4, cache_dir=cache)
    with one_line_error(FileNotFoundError, r"load_image_folder: no such folder '.*missing'"):
        load_image_folder(tmp_path / "missing", 4, cache_dir=cache)
    with one_line_error(NotADirectoryError, r"'.*a.png' is a file, expected a folder"):
        load_image_folder(flat / "a.png", 4, cache_dir=cache)
    for size in (0, (4,), (4, 0), 2.5, (True, 4)):
        with one_line_error(ValueError, r"size must be a positive integer or \(height, width\)"):
            load_image_folder(flat, size, cache_dir=cache)
    with one_line_error(ValueError, r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 4"):
        load_image_folder(flat, 4, channels=4, cache_dir=cache)


# ------------------------------------------------------------------------------------------------
# text


def text_folder(root, classes):
    for name, texts in classes.items():
        (root / name).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / name / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


def test_text_folder(tmp_path):
    train = text_folder(tmp_path / "train", {"neg": ["bad", "awful day"], "pos": ["good!"]})
    (train / "neg" / "notes.md").write_text("ignored")
    (train / "pos" / "03.TXT").write_text("nice")
    test = text_folder(tmp_path / "test", {"neg": ["bad\u2603"], "pos": ["zoo"]})
    split, classes, vocab = load_text_folder(train, seq_len=5, test_path=test)
    assert classes == ["neg", "pos"]
    assert vocab == Vocab.from_text("badawful daygood!nice")
    assert split.x_train.dtype == split.x_test.dtype == np.int32
    assert split.x_train.shape == (4, 5) and split.x_test.shape == (2, 5)
    np.testing.assert_array_equal(split.y_train, [0, 0, 1, 1])
    np.testing.assert_array_equal(split.y_test, [0, 1])

    def ids(text):
        return [vocab.chars.index(c) + 1 for c in text]

    unknown = vocab.size + 1
    assert num_text_ids(vocab) == vocab.size + 2
    np.testing.assert_array_equal(split.x_train, [ids("bad") + [0, 0], ids("awful"),
                                                  ids("good!"), ids("nice") + [0]])
    np.testing.assert_array_equal(split.x_test, [ids("bad") + [unknown, 0],
                                                 [unknown] + ids("oo") + [0, 0]])
    np.testing.assert_array_equal(encode_texts(["zoo"], vocab, 5), split.x_test[1:])
    assert vocab.decode(split.x_train[1] - 1) == "awful"

    given = Vocab.from_text("abd")
    split, _, same = load_text_folder(train, seq_len=3, test_path=test, vocab=given)
    assert same is given
    np.testing.assert_array_equal(split.x_train[0], [2, 1, 3])  # b, a, d
    np.testing.assert_array_equal(split.x_train[2], [4, 4, 4])  # g, o, o are unknown


def test_text_folder_split(tmp_path):
    texts = {"a": [f"a{i}" for i in range(6)], "b": ["b0", "b1", "b2x"]}
    root = text_folder(tmp_path / "texts", texts)
    split, _, vocab = load_text_folder(root, seq_len=3)
    y = np.array([0] * 6 + [1] * 3)
    held_out = expected_test_indices(y, 0.2)  # 1 of 6, 1 of 3
    all_texts = texts["a"] + texts["b"]
    assert vocab == Vocab.from_text("".join(np.delete(all_texts, held_out)))
    np.testing.assert_array_equal(split.y_test, y[held_out])
    np.testing.assert_array_equal(split.x_test, encode_texts([all_texts[i] for i in held_out],
                                                             vocab, 3))
    np.testing.assert_array_equal(split.x_train, encode_texts(list(np.delete(all_texts,
                                                                             held_out)),
                                                              vocab, 3))
    again = load_text_folder(root, seq_len=3)
    np.testing.assert_array_equal(again[0].x_test, split.x_test)


def test_text_folder_errors(tmp_path):
    root = text_folder(tmp_path / "texts", {"a": ["one"], "b": ["two"]})
    (root / "b" / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with one_line_error(ValueError, r"^load_text: '.*b/latin1.txt' is not UTF-8 text: byte 0xe9 "
                                    r"at offset 3 \(unexpected end of data\)$"):
        load_text_folder(root, seq_len=4, test_path=root)
    (root / "b" / "latin1.txt").unlink()
    (root / "c").mkdir()
    with one_line_error(ValueError, r"^load_text_folder: the class folder '.*texts/c' has no "
                                    r"text files \(\.txt\)$"):
        load_text_folder(root, seq_len=4)
    (root / "c").rmdir()
    with one_line_error(ValueError, r"^load_text_folder: no test examples can be held out"):
        load_text_folder(root, seq_len=4)
    with one_line_error(ValueError, r"load_text_folder: '.*a' must have a subfolder per class, "
                                    r"at least 2, got no subfolders"):
        load_text_folder(root / "a", seq_len=4)
    for seq_len in (0, -1, 2.0, True):
        with one_line_error(ValueError, r"seq_len must be a positive integer, got"):
            load_text_folder(root, seq_len=seq_len)
    other = text_folder(tmp_path / "other", {"a": ["x"], "c": ["y"]})
    with one_line_error(ValueError, r"the test folder '.*other' must have the classes of "
                                    r"'.*texts', \['a', 'b'\], got \['a', 'c'\]"):
        load_text_folder(root, seq_len=4, test_path=other)


def test_a_replaced_image_with_its_old_mtime_is_decoded_again(tmp_path):
    from PIL import Image

    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(2):
            # uncompressed: every image of the same size has the same number of bytes
            Image.new("RGB", (4, 4), colour).save(tmp_path / "img" / name / f"{i}.png",
                                                  compress_level=0)
    first, _ = load_image_folder(tmp_path / "img", 4, test_fraction=0.5,
                                 cache_dir=tmp_path / "cache")
    target = tmp_path / "img" / "a" / "0.png"
    stat = target.stat()
    replacement = tmp_path / "other.png"
    Image.new("RGB", (4, 4), (0, 255, 0)).save(replacement, compress_level=0)
    assert replacement.stat().st_size == stat.st_size  # same size and mtime: as cp -p leaves
    os.replace(replacement, target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, _ = load_image_folder(tmp_path / "img", 4, test_fraction=0.5,
                                 cache_dir=tmp_path / "cache")
    assert not np.array_equal(np.concatenate([first.x_train, first.x_test]),
                              np.concatenate([again.x_train, again.x_test]))


def test_an_unwritable_cache_is_skipped_with_a_warning(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (3, 3), 40 * i).save(tmp_path / "img" / name / f"{i}.png")
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="load_image_folder: the decoded images are not cached"):
        split, classes = load_image_folder(tmp_path / "img", 3, channels=1, test_fraction=0.5,
                                           cache_dir=tmp_path / "file" / "cache")
    assert classes == ["a", "b"] and split.x_train.shape == (2, 3, 3, 1)
