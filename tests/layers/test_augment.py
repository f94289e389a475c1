"""Augmentation layers and batch mixes: the identity in evaluation, keys, outputs against numpy
references (each crop a window of the padded image, each flip the image or its mirror, shifts
and cutout squares recovered by brute force), statistics of the draws with bounds that a fixed
key cannot cross by chance, per-example draws, jit, vmap, and the errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, rand

KEY = jax.random.key(7)

LAYERS = {
    "RandomCrop": lambda: fnn.RandomCrop(2),
    "RandomCrop-reflect": lambda: fnn.RandomCrop(2, mode="reflect"),
    "RandomTranslate": lambda: fnn.RandomTranslate(1),
    "RandomFlip": lambda: fnn.RandomFlip(vertical=True),
    "GaussianNoise": lambda: fnn.GaussianNoise(0.3),
    "Cutout": lambda: fnn.Cutout(3),
}
NAMES = {"RandomCrop-reflect": "RandomCrop"}


def apply(layer, x, key=KEY, train=True):
    y, state = jax.jit(lambda x, k: layer.apply({}, {}, x, key=k, train=train))(x, key)
    assert state == {}
    return np.asarray(y)


def images(shape, seed=1):
    """Distinct random values, so that every window, flip and shift of an image is unique."""
    return f32(rand(shape, seed))


# ============================================================================= the contract

@pytest.mark.parametrize("name", LAYERS)
def test_evaluation_is_the_identity_and_needs_no_key(name):
    layer = LAYERS[name]()
    x = images((3, 5, 6, 2))
    assert layer.init(jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype)) == ({}, {})
    for key in (None, KEY):
        y, state = layer.apply({}, {}, x, key=key, train=False)
        assert state == {} and y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("name", LAYERS)
def test_training_needs_a_key(name):
    layer_name = NAMES.get(name, name)
    with pytest.raises(fnn.MissingKeyError, match=re.escape(
            f"{layer_name} is stochastic and needs a random key when train=True; call "
            f"apply(params, state, x, key=jax.random.key(0), train=True)")):
        LAYERS[name]().apply({}, {}, images((2, 5, 6, 1)), train=True)


@pytest.mark.parametrize("name", LAYERS)
def test_params_are_checked(name):
    with pytest.raises(fnn.ParamError, match=re.escape(
            f"{NAMES.get(name, name)}: expected params {{}}, got {{w: float32[2]}}")):
        LAYERS[name]().apply({"w": jnp.zeros(2)}, {}, images((2, 5, 6, 1)))


@pytest.mark.parametrize("layer", [fnn.RandomCrop(0), fnn.RandomTranslate(0),
                                   fnn.RandomFlip(p=0.0), fnn.GaussianNoise(0.0),
                                   fnn.Cutout(3, p=0.0)], ids=repr)
def test_settings_that_change_nothing_are_the_identity_in_training(layer):
    x = images((3, 5, 6, 2))
    y, _ = layer.apply({}, {}, x, train=True)  # and need no key
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("name", LAYERS)
def test_same_key_same_output_and_jit_equals_eager(name):
    layer = LAYERS[name]()
    x = images((8, 5, 6, 2))
    eager, _ = layer.apply({}, {}, x, key=KEY, train=True)
    np.testing.assert_allclose(apply(layer, x), np.asarray(eager), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(apply(layer, x), apply(layer, x))
    assert not np.array_equal(apply(layer, x), apply(layer, x, key=jax.random.key(8)))


@pytest.mark.parametrize("name", LAYERS)
def test_each_example_gets_its_own_draw(name):
    # one image repeated over the batch: identical outputs would mean one draw for the batch
    x = jnp.broadcast_to(images((1, 5, 6, 2)), (32, 5, 6, 2))
    y = apply(LAYERS[name](), x)
    distinct = {y[i].tobytes() for i in range(32)}
    assert len(distinct) >= 3, len(distinct)


@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_an_extra_leading_axis(name):
    layer = LAYERS[name]()
    x = images((3, 4, 5, 6, 2))  # [groups, batch, H, W, C]
    keys = jax.random.split(KEY, 3)

    def one(xi, k):
        return layer.apply({}, {}, xi, key=k, train=True)[0]

    mapped = np.asarray(jax.jit(jax.vmap(one))(x, keys))
    for i in range(3):
        np.testing.assert_allclose(mapped[i], apply(layer, x[i], keys[i]), rtol=1e-6, atol=1e-6)
    # the leading axes may also be given at once: every image of [groups, batch] is drawn
    both = apply(layer, x)
    assert both.shape == x.shape and len({both[i, j].tobytes() for i in range(3)
                                          for j in range(4)}) >= 3


# ============================================================================= RandomCrop

def windows(padded, height, width):
    """Every ``height x width`` window of ``padded: [H', W', C]`` by its offset."""
    return {(r, c): padded[r:r + height, c:c + width]
            for r in range(padded.shape[0] - height + 1)
            for c in range(padded.shape[1] - width + 1)}


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_random_crop_is_a_window_of_the_padded_image_at_the_drawn_offset(mode):
    pad, (n, h, w, c) = 2, (200, 5, 6, 2)
    x = np.asarray(images((n, h, w, c)))
    y = apply(fnn.RandomCrop(pad, mode=mode), jnp.asarray(x))
    found = []
    for i in range(n):
        # numpy's modes of the same names
        padded = np.pad(x[i], [(pad, pad), (pad, pad), (0, 0)], mode=mode)
        matches = [o for o, win in windows(padded, h, w).items() if np.array_equal(win, y[i])]
        assert len(matches) == 1, (i, matches)
        found.append(matches[0])
    # the offsets are those of the documented draw: uniform in [0, 2 * pad] per axis and image
    drawn = np.asarray(jax.random.randint(KEY, (n, 2), 0, 2 * pad + 1))
    np.testing.assert_array_equal(np.array(found), drawn)
    assert set(map(tuple, found)) == {(r, c) for r in range(5) for c in range(5)}


def test_random_crop_reflect_mirrors_without_repeating_the_edge():
    x = jnp.arange(4, dtype=jnp.float32).reshape(1, 1, 4, 1) * jnp.ones((64, 3, 1, 1))
    y = apply(fnn.RandomCrop(1, mode="reflect"), x)
    rows = {tuple(y[i, 1, :, 0]) for i in range(64)}
    # shifted left, unshifted, shifted right: the mirrored pixel is 1 or 2, never the edge again
    assert rows == {(1, 0, 1, 2), (0, 1, 2, 3), (1, 2, 3, 2)}


def test_random_crop_keeps_integer_and_bfloat16_dtypes():
    x = jnp.arange(2 * 4 * 4, dtype=jnp.uint8).reshape(2, 4, 4, 1)
    assert apply(fnn.RandomCrop(1), x).dtype == np.uint8
    assert apply(fnn.RandomCrop(1), x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ============================================================================= RandomTranslate

def shifted(image, dy, dx):
    """``image: [H, W, C]`` moved down by ``dy`` and right by ``dx``, zeros shifted in."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_random_translate_is_a_shift_with_zeros_shifted_in():
    m, (n, h, w, c) = 2, (150, 6, 7, 2)
    x = np.asarray(images((n, h, w, c)))
    y = apply(fnn.RandomTranslate(m), jnp.asarray(x))
    shifts = []
    for i in range(n):
        matches = [(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)
                   if np.array_equal(shifted(x[i], dy, dx), y[i])]
        assert len(matches) == 1, (i, matches)
        shifts.append(matches[0])
    assert set(shifts) == {(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)}
    # the same draw as RandomCrop(m) on a zero-padded image
    np.testing.assert_array_equal(y, apply(fnn.RandomCrop(m), jnp.asarray(x)))


def test_random_translate_of_ones_has_as_many_zero_rows_and_columns_as_its_shift():
    m = 3
    y = apply(fnn.RandomTranslate(m), jnp.ones((300, 8, 9, 1), jnp.float32))
    counts = set()
    for image in y[..., 0]:
        zero_rows = int(np.sum(np.all(image == 0, axis=1)))
        zero_cols = int(np.sum(np.all(image == 0, axis=0)))
        assert zero_rows <= m and zero_cols <= m
        # the rest is ones: a block of (8 - |dy|) x (9 - |dx|)
        assert int(image.sum()) == (8 - zero_rows) * (9 - zero_cols)
        counts.add((zero_rows, zero_cols))
    assert counts == {(r, c) for r in range(m + 1) for c in range(m + 1)}


# ============================================================================= RandomFlip

def test_random_flip_flips_each_image_or_leaves_it_with_probability_p():
    n, p = 1000, 0.3
    x = np.asarray(images((n, 4, 5, 2)))
    y = apply(fnn.RandomFlip(p=p), jnp.asarray(x))
    flipped = np.array([np.array_equal(y[i], x[i, :, ::-1]) for i in range(n)])
    kept = np.array([np.array_equal(y[i], x[i]) for i in range(n)])
    assert np.all(flipped ^ kept)
    # binomial(1000, 0.3): standard deviation 0.0145, the bound is 7 of them
    assert abs(flipped.mean() - p) < 0.1, flipped.mean()


def test_random_flip_both_axes_draws_each_axis_on_its_own():
    n, p = 1000, 0.5
    x = np.asarray(images((n, 4, 5, 1)))
    y = apply(fnn.RandomFlip(horizontal=True, vertical=True, p=p), jnp.asarray(x))
    variants = {(h, v): x[:, ::-1 if v else 1, ::-1 if h else 1]
                for h in (False, True) for v in (False, True)}
    which = []
    for i in range(n):
        matches = [hv for hv, var in variants.items() if np.array_equal(y[i], var[i])]
        assert len(matches) == 1, (i, matches)
        which.append(matches[0])
    which = np.array(which)
    for axis in (0, 1):
        assert abs(which[:, axis].mean() - p) < 0.1
    # independent: all four combinations, each near p * p = 1/4
    combos = which[:, 0] * 2 + which[:, 1]
    assert np.all(np.abs(np.bincount(combos, minlength=4) / n - 0.25) < 0.1)
    vertical = apply(fnn.RandomFlip(horizontal=False, vertical=True, p=1.0), jnp.asarray(x))
    np.testing.assert_array_equal(vertical, x[:, ::-1])


# ============================================================================= GaussianNoise

@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 0.01), (jnp.bfloat16, 0.03)])
def test_gaussian_noise_has_mean_zero_and_the_given_stddev(dtype, tol):
    stddev = 0.5
    x = jnp.full((100, 1000), 2.0, dtype)
    y = apply(fnn.GaussianNoise(stddev), x)
    assert y.dtype == dtype
    noise = np.asarray(y, np.float64) - 2.0
    # 100,000 draws: the standard error of the mean is 0.0016, of the stddev 0.0011
    assert abs(noise.mean()) < tol * stddev * 2
    assert abs(noise.std() - stddev) < tol * stddev * 2
    # a normal distribution: about 68.3% within one stddev
    assert abs(np.mean(np.abs(noise) < stddev) - 0.683) < 0.02


def test_gaussian_noise_passes_a_seq_through_and_refuses_integers():
    x = images((2, 5, 4))
    seq = fnn.Seq(x, lengths=jnp.array([5, 2], jnp.int32))
    y, _ = fnn.GaussianNoise(0.1).apply({}, {}, seq, key=KEY, train=True)
    plain, _ = fnn.GaussianNoise(0.1).apply({}, {}, x, key=KEY, train=True)
    assert isinstance(y, fnn.Seq)
    np.testing.assert_array_equal(np.asarray(y.lengths), [5, 2])
    np.testing.assert_array_equal(np.asarray(y.x), np.asarray(plain))
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "GaussianNoise: expected a floating-point input [...], got int32[2, 3]")):
        fnn.GaussianNoise(0.1).init(KEY, jnp.zeros((2, 3), jnp.int32))


# ============================================================================= Cutout

def clipped_square(h, w, cy, cx, size):
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    top, left = cy - size // 2, cx - size // 2
    return (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)


@pytest.mark.parametrize("size", [3, 4])
def test_cutout_zeroes_exactly_a_clipped_square(size):
    n, h, w = 300, 7, 8
    y = apply(fnn.Cutout(size), jnp.ones((n, h, w, 2), jnp.float32))
    squares = {(cy, cx): clipped_square(h, w, cy, cx, size) for cy in range(h) for cx in range(w)}
    areas, centres = [], set()
    for image in y:
        zero = image == 0
        assert np.array_equal(zero[..., 0], zero[..., 1])  # every channel
        matches = [c for c, sq in squares.items() if np.array_equal(sq, zero[..., 0])]
        assert matches, "not a clipped square"
        assert np.all(image[~zero] == 1)
        areas.append(int(zero[..., 0].sum()))
        centres.update(matches)
    # full squares inside the image and squares clipped at the border, centres all over it
    assert max(areas) == size * size and min(areas) < size * size
    assert len(centres) > 0.8 * h * w


def test_cutout_with_p_cuts_about_p_of_the_images():
    n, p = 1000, 0.4
    y = apply(fnn.Cutout(2, p=p), jnp.ones((n, 6, 6, 1), jnp.float32))
    cut = np.any(y == 0, axis=(1, 2, 3))
    assert abs(cut.mean() - p) < 0.1, cut.mean()  # standard deviation 0.015


# ============================================================================= mixup and cutmix

def partners(soft, labels):
    """The mixing weight and each example's partner, read from soft labels of distinct
    labels: ``lam`` on the example's own label, ``1 - lam`` on its partner's."""
    lam = soft[np.arange(len(labels)), labels]
    other = soft.copy()
    other[np.arange(len(labels)), labels] = 0
    index_of = np.argsort(labels)  # the example of each label
    j = np.where(lam < 1, index_of[other.argmax(-1)], np.arange(len(labels)))
    return lam, j


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_mixup_is_a_convex_combination_with_matching_soft_labels(alpha):
    x = images((12, 4, 5, 3))
    labels = jnp.arange(12, dtype=jnp.int32)[::-1]  # distinct, so each partner can be read
    mix = jax.jit(lambda k: fnn.mixup(k, x, labels, 15, alpha=alpha))
    for seed in range(4):
        mixed, soft = mix(jax.random.key(seed))
        soft, labels_ = np.asarray(soft), np.asarray(labels)
        assert soft.dtype == np.float32 and soft.shape == (12, 15)
        np.testing.assert_allclose(soft.sum(-1), 1, rtol=1e-6)
        lam, j = partners(soft, labels_)
        assert sorted(j) == list(range(12))  # a permutation of the batch
        mixes = j != np.arange(12)  # an example mixed with itself keeps its label
        lam = lam[mixes][0]
        assert np.all(soft[mixes, labels_[mixes]] == lam) and 0 < lam < 1  # one draw
        np.testing.assert_allclose(soft[mixes, labels_[j[mixes]]], 1 - lam, rtol=1e-6)
        assert np.count_nonzero(soft[mixes]) == 2 * mixes.sum()
        expected = lam * np.asarray(x, np.float64) + (1 - lam) * np.asarray(x)[j]
        np.testing.assert_allclose(np.asarray(mixed), expected, rtol=1e-5, atol=1e-6)


def test_mixup_lambda_follows_beta_alpha_alpha():
    x, labels = jnp.zeros((16, 3)), jnp.arange(16, dtype=jnp.int32)
    keys = jax.random.split(KEY, 4000)
    soft = jax.jit(jax.vmap(lambda k: fnn.mixup(k, x, labels, 16, alpha=0.5)[1]))(keys)
    # lam on the own label of every example mixed with another (all but the fixed points of
    # the permutation, which keep 1)
    lam = np.asarray(jnp.min(jnp.diagonal(soft, axis1=1, axis2=2), axis=1))
    # Beta(0.5, 0.5): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 1/8, U-shaped
    assert abs(lam.mean() - 0.5) < 0.03
    assert abs(lam.var() - 1 / 8) < 0.01
    assert np.mean((lam < 0.1) | (lam > 0.9)) > 0.35  # ~0.41 for Beta(0.5, 0.5), 0.2 if uniform


def test_mixup_keeps_bfloat16_and_marks_labels_outside_the_head():
    x = images((4, 3)).astype(jnp.bfloat16)
    mixed, soft = jax.jit(lambda k, x, y: fnn.mixup(k, x, y, 5, alpha=1.0))(
        KEY, x, jnp.array([0, 1, 2, 5], jnp.int32))
    assert mixed.dtype == jnp.bfloat16 and soft.dtype == jnp.float32
    soft = np.asarray(soft)
    assert np.all(np.isnan(soft[3]))  # label 5 of 5 classes: the loss becomes NaN
    logits = jnp.zeros((4, 5))
    assert np.isnan(float(fnn.losses.softmax_cross_entropy(logits, soft)))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_cutmix_pastes_one_box_and_corrects_lambda_to_its_area(alpha):
    n, h, w, c = 10, 9, 12, 3
    x = np.asarray(images((n, h, w, c)))
    labels = np.arange(n, dtype=np.int32)
    boxes = []
    mix = jax.jit(lambda k: fnn.cutmix(k, jnp.asarray(x), jnp.asarray(labels), n, alpha=alpha))
    for seed in range(12):
        mixed, soft = mix(jax.random.key(seed))
        mixed, soft = np.asarray(mixed), np.asarray(soft)
        np.testing.assert_allclose(soft.sum(-1), 1, rtol=1e-6)
        lam, j = partners(soft, labels)
        mixes = j != np.arange(n)
        changed = np.any(mixed != x, axis=-1)  # [n, H, W]
        assert not changed[~mixes].any()
        if not mixes.any():  # an empty box: nothing changes, every example keeps its label
            assert not changed.any() and np.all(lam == 1)
            continue
        assert np.all(lam[mixes] == lam[mixes][0])
        lam = lam[mixes]
        box = changed[mixes][0]
        assert np.all(changed[mixes] == box)  # one box for the batch
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert np.array_equal(box, np.outer(box.any(1), box.any(0)))  # a rectangle
        assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
        np.testing.assert_allclose(lam[0], 1 - box.sum() / (h * w), rtol=1e-6)
        expected = np.where(box[None, :, :, None], x[j], x)
        np.testing.assert_array_equal(mixed, expected)
        boxes.append((rows[0], rows[-1], cols[0], cols[-1]))
    assert len(set(boxes)) >= 8  # a new box for each key
    # boxes touch the border (clipped) and lie inside it
    assert any(b[0] == 0 or b[1] == h - 1 or b[2] == 0 or b[3] == w - 1 for b in boxes)
    assert any(b[0] > 0 and b[1] < h - 1 and b[2] > 0 and b[3] < w - 1 for b in boxes)


def test_cutmix_takes_integer_images():
    x = jnp.arange(4 * 6 * 6, dtype=jnp.uint8).reshape(4, 6, 6, 1)
    mixed, soft = jax.jit(lambda k, x, y: fnn.cutmix(k, x, y, 4, alpha=1.0))(
        KEY, x, jnp.arange(4, dtype=jnp.int32))
    assert mixed.dtype == jnp.uint8 and soft.dtype == jnp.float32


def test_mixed_soft_labels_train_with_the_loss():
    x, labels = images((6, 4, 4, 1)), jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    model = fnn.serial(fnn.Flatten(-3), fnn.Dense(3))
    params, _ = model.init(KEY, x)

    def loss(params, key):
        mixed, soft = fnn.cutmix(key, x, labels, 3, alpha=1.0)
        return fnn.losses.softmax_cross_entropy(model.apply(params, {}, mixed)[0], soft)

    value, grads = jax.jit(jax.value_and_grad(loss))(params, KEY)
    assert np.isfinite(float(value)) and np.any(np.asarray(grads["1"]["w"]) != 0)


# ============================================================================= errors

@pytest.mark.parametrize("make, error, message", [
    (lambda: fnn.RandomCrop(-1), ValueError,
     "RandomCrop: padding must be an integer >= 0, got -1"),
    (lambda: fnn.RandomCrop(1.5), ValueError,
     "RandomCrop: padding must be an integer >= 0, got 1.5"),
    (lambda: fnn.RandomCrop(True), ValueError,
     "RandomCrop: padding must be an integer >= 0, got True"),
    (lambda: fnn.RandomCrop(2, mode="wrap"), ValueError,
     "RandomCrop: mode must be one of 'constant', 'reflect', 'edge', got 'wrap'"),
    (lambda: fnn.RandomTranslate(-2), ValueError,
     "RandomTranslate: max_shift must be an integer >= 0, got -2"),
    (lambda: fnn.RandomFlip(p=1.5), ValueError,
     "RandomFlip: p must be a probability in [0, 1], got 1.5"),
    (lambda: fnn.RandomFlip(horizontal=False), ValueError,
     "RandomFlip: horizontal and vertical are both False"),
    (lambda: fnn.RandomFlip(vertical=1), TypeError, "RandomFlip: vertical must be a bool, got 1"),
    (lambda: fnn.GaussianNoise(-0.1), ValueError,
     "GaussianNoise: stddev must be a finite number >= 0, got -0.1"),
    (lambda: fnn.GaussianNoise(float("nan")), ValueError,
     "GaussianNoise: stddev must be a finite number >= 0, got nan"),
    (lambda: fnn.Cutout(0), ValueError, "Cutout: size must be a positive integer, got 0"),
    (lambda: fnn.Cutout(2, p=-0.5), ValueError,
     "Cutout: p must be a probability in [0, 1], got -0.5"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_are_rejected(make, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make()


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "GaussianNoise"])
def test_inputs_that_are_not_images_are_rejected(name):
    layer, layer_name = LAYERS[name](), NAMES.get(name, name)
    expected = f"{layer_name}: expected input [..., height, width, channels], got"
    with pytest.raises(fnn.ShapeError, match=re.escape(f"{expected} float32[4, 6]")):
        layer.init(KEY, jax.ShapeDtypeStruct((4, 6), jnp.float32))
    for train in (False, True):
        with pytest.raises(fnn.ShapeError, match=re.escape(f"{expected} float32[4, 6]")):
            layer.apply({}, {}, jnp.zeros((4, 6)), key=KEY, train=train)
    # images have no sequence side inputs: a Seq is refused rather than cropped blindly
    with pytest.raises(fnn.ShapeError, match=re.escape(f"{expected} Seq(x=float32[2, 5, 6, 1]")):
        layer.apply({}, {}, fnn.Seq(jnp.zeros((2, 5, 6, 1)), lengths=jnp.ones(2, jnp.int32)),
                    key=KEY, train=True)
    # inside a model the error names the layer's path
    with pytest.raises(fnn.ShapeError, match=re.escape(f"{layer_name} at aug:")):
        fnn.serial(aug=layer, head=fnn.Dense(2)).init(KEY, jnp.zeros((4, 6)))


@pytest.mark.parametrize("call, error, message", [
    (lambda: fnn.mixup(KEY, jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32), 3, alpha=0.0),
     ValueError, "mixup: alpha must be a number > 0, got 0.0"),
    (lambda: fnn.cutmix(KEY, jnp.zeros((4, 3, 3, 1)), jnp.zeros(4, jnp.int32), 0, alpha=1.0),
     ValueError, "cutmix: num_classes must be a positive integer, got 0"),
    (lambda: fnn.mixup(KEY, jnp.zeros((4, 3)), jnp.zeros(3, jnp.int32), 3, alpha=1.0),
     fnn.ShapeError, "mixup: expected labels int[4] (a class id per example of x "
                     "float32[4, 3]), got int32[3]"),
    (lambda: fnn.mixup(KEY, jnp.zeros((4, 3)), jnp.zeros(4), 3, alpha=1.0),
     fnn.ShapeError, "mixup: expected labels int[4] (a class id per example of x "
                     "float32[4, 3]), got float32[4]"),
    (lambda: fnn.mixup(KEY, jnp.zeros((4, 3), jnp.int32), jnp.zeros(4, jnp.int32), 3, alpha=1.0),
     fnn.ShapeError, "mixup: expected a floating-point input [batch, ...], got int32[4, 3]"),
    (lambda: fnn.mixup(KEY, jnp.zeros(()), jnp.zeros((), jnp.int32), 3, alpha=1.0),
     fnn.ShapeError, "mixup: expected input [batch, ...], got float32[]"),
    (lambda: fnn.cutmix(KEY, jnp.zeros((4, 3, 3)), jnp.zeros(4, jnp.int32), 3, alpha=1.0),
     fnn.ShapeError, "cutmix: expected input [batch, height, width, channels], got "
                     "float32[4, 3, 3]"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_mix_arguments_are_rejected(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()
