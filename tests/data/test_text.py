"""Character-level text data: the bundled corpus, the vocabulary, users' own files and
sequence batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from fnn.data.text import (TextSplit, Vocab, default_corpus, load_text, num_sequence_batches,
                           sequence_batches)


@pytest.fixture(scope="module")
def corpus():
    return load_text()


def test_default_corpus(corpus):
    assert isinstance(corpus, TextSplit)
    n = len(corpus.train) + len(corpus.valid)
    assert n > 400_000
    assert len(corpus.valid) == round(0.1 * n)
    assert corpus.train.dtype == np.int32 and corpus.valid.dtype == np.int32
    # the split is the last 10% of the text, and decoding gives the text back
    assert corpus.vocab.decode(np.concatenate([corpus.train, corpus.valid])) == default_corpus()
    assert 50 < corpus.vocab.size < 300
    assert corpus.vocab.chars == "".join(sorted(corpus.vocab.chars))


def test_vocab_roundtrip_and_unknown(corpus):
    vocab = corpus.vocab
    text = "def f(x):\n    return x + 1  # ok"
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert vocab.decode(ids) == text
    assert vocab.decode(jnp.asarray(ids)) == text
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("snow \u2603")
    with pytest.raises(ValueError, match="ids must be integers"):
        vocab.decode([vocab.size])
    assert Vocab.from_text("hello").encode("hell").tolist() == [1, 0, 2, 2]


def test_user_file(tmp_path):
    text = "héllo wörld\n" * 50
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    split = load_text(path)
    assert len(split.valid) == 60 and len(split.train) == 540
    assert split.vocab.chars == "".join(sorted(set(text)))
    assert split.vocab.decode(split.train) + split.vocab.decode(split.valid) == text


def test_sequence_batches():
    ids = np.arange(103, dtype=np.int32)
    batches = list(sequence_batches(ids, 3, 10))
    assert len(batches) == num_sequence_batches(len(ids), 3, 10) == 3  # 10 windows -> 3 batches
    x, y = batches[0]
    assert x.shape == y.shape == (3, 10) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[1], ids[10:20])
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(batches[1][0][0], ids[30:40])

    seeded = list(sequence_batches(ids, 3, 10, seed=0, epoch=1))
    assert len(seeded) == 3
    for x, y in seeded:
        np.testing.assert_array_equal(y, x + 1)  # consecutive ids: y is x shifted by one
        assert x.max() < 102 and y.max() <= 102
    again = list(sequence_batches(ids, 3, 10, seed=0, epoch=1))
    other = list(sequence_batches(ids, 3, 10, seed=0, epoch=2))
    np.testing.assert_array_equal(seeded[0][0], again[0][0])
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(seeded, other))
    with pytest.raises(ValueError, match="too few"):
        next(sequence_batches(ids[:5], 1, 10))


def test_load_text_names_a_file_it_cannot_read(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"load_text: .* is a directory, not a text file"):
        load_text(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("ab\ncaf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"^load_text: '.*latin1.txt' is not UTF-8 text: byte "
                                         r"0xe9 at offset 6 \(invalid continuation byte\)$"):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"at least 2 characters, got 0 in '.*empty.txt'"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\rthree\n" * 3)  # universal newlines
    split = load_text(tmp_path / "crlf.txt")
    assert "\r" not in split.vocab.chars
