"""Cross-cutting properties, checked for every public layer, combinator and model.

Each descriptor gives a layer and a batched input (an array, a ``Seq`` with side inputs, or a
tuple of arrays built by ``make_input``, e.g. FiLM's ``(x, condition)``).
Every descriptor must: give the same result under ``jit`` as eagerly; give under ``jax.vmap``
over single examples the same as the batched call; have finite gradients; have
``jax.eval_shape`` agree with the real output; run on bfloat16 inputs; and not recompile a
jitted call on new values of the same shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.combinators import remat
from fnn.core import as_spec
from fnn.layers import ACTIVATIONS
from fnn.models import MLP, LeNet, ResNet
from fnn.precision import Policy, with_policy


@dataclasses.dataclass(frozen=True)
class Descriptor:
    name: str
    make: Callable[[], fnn.Layer]
    shape: tuple[int, ...]  # batched input shape; the first axis is the batch
    ints: int = 0  # > 0: integer ids in [0, ints) instead of floats
    stochastic: bool = False  # uses the key in training
    batch_stats: bool = False  # train=True mixes examples (BatchNorm), so vmap runs in eval mode
    side: Callable[[jax.Array], dict] | None = None  # the Seq's side inputs, given the array
    # builds the batched input (a tuple of arrays, say) from a key, in place of shape and ints;
    # every leaf has the batch as its first axis
    make_input: Callable[[jax.Array], Any] | None = None

    def __str__(self):
        return self.name


def _input(d: Descriptor, dtype=jnp.float32, seed: int = 1):
    key = jax.random.key(seed)
    if d.make_input is not None:
        return d.make_input(key)
    if d.ints:
        x = jax.random.randint(key, d.shape, 0, d.ints)
    else:
        x = jax.random.normal(key, d.shape, jnp.float32).astype(dtype)
    return x if d.side is None else fnn.Seq(x, **d.side(x))


def _lengths(x):
    """Per-example lengths: the full length for the first example, shorter for the rest."""
    time = x.shape[1]
    return {"lengths": jnp.maximum(time - jnp.arange(x.shape[0], dtype=jnp.int32) * 2, 1)}


def _memory(x):
    return {"memory": jnp.cos(jnp.arange(x.shape[0] * 4 * 6, dtype=jnp.float32)).reshape(
        x.shape[0], 4, 6).astype(x.dtype), "memory_lengths": jnp.full(x.shape[:1], 3, jnp.int32)}


def _film_input(key):
    """``(x, condition)``: a feature map and a vector per example."""
    x_key, c_key = jax.random.split(key)
    return (jax.random.normal(x_key, (2, 4, 4, 3)), jax.random.normal(c_key, (2, 5)))


def _unet_input(x_shape, labels=None, float_t=False):
    """``(x_t, t)`` or ``(x_t, t, labels)`` for a U-Net: noisy images, timesteps (ints in
    [0, 1000), or floats), and class ids (the last one the null label)."""
    def make(key):
        x_key, t_key = jax.random.split(key)
        x = jax.random.normal(x_key, x_shape)
        t = (jax.random.uniform(t_key, x_shape[:1]) * 1000.0 if float_t
             else jax.random.randint(t_key, x_shape[:1], 0, 1000))
        return (x, t) if labels is None else (x, t, jnp.arange(x_shape[0]) % (labels + 1))
    return make


def _array(y):
    return y.x if isinstance(y, fnn.Seq) else y


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        tree)


DESCRIPTORS = [
    Descriptor("Dense", lambda: fnn.Dense(4), (3, 5)),
    Descriptor("Dense-no-bias", lambda: fnn.Dense(4, use_bias=False), (3, 2, 5)),
    *[Descriptor(f"activation-{name}", factory, (3, 5)) for name, factory in ACTIVATIONS.items()],
    Descriptor("Softmax", fnn.Softmax, (3, 5)),
    Descriptor("LogSoftmax", fnn.LogSoftmax, (3, 5)),
    Descriptor("Lambda", lambda: fnn.Lambda(jnp.sin, "sin"), (3, 5)),
    Descriptor("PReLU", fnn.PReLU, (3, 5)),
    Descriptor("PReLU-per-channel", lambda: fnn.PReLU(per_channel=True), (2, 4, 4, 3)),
    Descriptor("Dropout", lambda: fnn.Dropout(0.3), (3, 5), stochastic=True),
    Descriptor("RandomCrop", lambda: fnn.RandomCrop(2), (3, 5, 6, 2), stochastic=True),
    Descriptor("RandomCrop-reflect", lambda: fnn.RandomCrop(1, mode="reflect"), (3, 5, 6, 2),
               stochastic=True),
    Descriptor("RandomTranslate", lambda: fnn.RandomTranslate(1), (3, 5, 6, 2), stochastic=True),
    Descriptor("RandomFlip", lambda: fnn.RandomFlip(vertical=True), (3, 5, 6, 2),
               stochastic=True),
    Descriptor("GaussianNoise", lambda: fnn.GaussianNoise(0.1), (3, 5), stochastic=True),
    Descriptor("Cutout", lambda: fnn.Cutout(2), (3, 5, 6, 2), stochastic=True),
    Descriptor("serial-augmentation-LeNet",
               lambda: fnn.serial(fnn.RandomCrop(1), fnn.Cutout(2), fnn.GaussianNoise(0.1),
                                  LeNet(10, features=(4,), kernel_size=3, hidden_features=8)),
               (2, 8, 8, 1), stochastic=True),
    Descriptor("Flatten", lambda: fnn.Flatten(-2), (3, 4, 5)),
    Descriptor("Reshape", lambda: fnn.Reshape((10, 2), start_axis=-2), (3, 4, 5)),
    Descriptor("Embedding", lambda: fnn.Embedding(11, 4), (3, 6), ints=11),
    Descriptor("Conv1D", lambda: fnn.Conv(4, 3, strides=2), (2, 9, 3)),
    Descriptor("Conv2D", lambda: fnn.Conv(4, (3, 3), padding="VALID", dilation=2), (2, 7, 7, 3)),
    Descriptor("Conv3D", lambda: fnn.Conv(2, (2, 2, 2), padding=1), (2, 4, 4, 4, 2)),
    Descriptor("Conv-depthwise", lambda: fnn.Conv(6, (3, 3), feature_group_count=3), (2, 5, 5, 3)),
    Descriptor("ConvTranspose1D", lambda: fnn.ConvTranspose(3, 3, strides=2), (2, 5, 2)),
    Descriptor("ConvTranspose2D", lambda: fnn.ConvTranspose(3, (3, 3), strides=2,
                                                            padding="VALID"), (2, 4, 4, 2)),
    Descriptor("ConvTranspose-grouped",
               lambda: fnn.ConvTranspose(4, (3, 3), strides=2, padding=[(1, 0), (1, 0)],
                                         feature_group_count=2), (2, 3, 3, 4)),
    Descriptor("SeparableConv", lambda: fnn.SeparableConv(4, (3, 3), depth_multiplier=2),
               (2, 5, 5, 3)),
    Descriptor("SeparableConv1D-valid-strides",
               lambda: fnn.SeparableConv(3, 3, strides=2, padding="VALID", use_bias=False),
               (2, 9, 2)),
    Descriptor("Upsample-nearest", lambda: fnn.Upsample(2), (2, 3, 4, 2)),
    Descriptor("Upsample-linear", lambda: fnn.Upsample(size=(5, 7), method="linear"),
               (2, 3, 4, 2)),
    Descriptor("Upsample1D-linear-align-corners",
               lambda: fnn.Upsample((2.5,), method="linear", align_corners=True), (2, 5, 3)),
    Descriptor("PixelShuffle", lambda: fnn.PixelShuffle(2), (2, 3, 3, 8)),
    Descriptor("PixelUnshuffle", lambda: fnn.PixelUnshuffle(2), (2, 4, 6, 2)),
    Descriptor("Pad-zeros", lambda: fnn.Pad(1, value=0.5), (2, 4, 4, 2)),
    Descriptor("Pad1D-reflect", lambda: fnn.Pad([(2, 1)], mode="reflect"), (2, 5, 3)),
    Descriptor("Pad-replicate", lambda: fnn.Pad([(1, 2), (0, 1)], mode="replicate"),
               (2, 4, 4, 2)),
    Descriptor("Pad3D-circular", lambda: fnn.Pad([(1, 1), (0, 2), (1, 0)], mode="circular"),
               (2, 3, 3, 3, 2)),
    Descriptor("MaxPool1D", lambda: fnn.MaxPool(2), (2, 8, 3)),
    Descriptor("MaxPool2D", lambda: fnn.MaxPool((3, 3), strides=2, padding="SAME"), (2, 7, 7, 3)),
    Descriptor("AvgPool2D", lambda: fnn.AvgPool((2, 2), padding=1, count_include_pad=False),
               (2, 5, 5, 3)),
    Descriptor("AvgPool3D", lambda: fnn.AvgPool((2, 2, 2)), (2, 4, 4, 4, 2)),
    Descriptor("AdaptiveAvgPool-non-divisible", lambda: fnn.AdaptiveAvgPool((3, 2)),
               (2, 7, 5, 3)),
    Descriptor("AdaptiveAvgPool1D-larger-output", lambda: fnn.AdaptiveAvgPool((7,)), (2, 5, 3)),
    Descriptor("AdaptiveMaxPool-non-divisible", lambda: fnn.AdaptiveMaxPool(2), (2, 5, 5, 3)),
    Descriptor("GlobalAvgPool", lambda: fnn.GlobalAvgPool(-3), (2, 4, 4, 3)),
    Descriptor("GlobalMaxPool", lambda: fnn.GlobalMaxPool(-3), (2, 4, 4, 3)),
    Descriptor("BatchNorm", lambda: fnn.BatchNorm(momentum=0.9), (4, 3, 3, 5), batch_stats=True),
    Descriptor("LayerNorm", fnn.LayerNorm, (3, 6)),
    Descriptor("RMSNorm", fnn.RMSNorm, (3, 6)),
    Descriptor("GroupNorm", lambda: fnn.GroupNorm(2, start_axis=-3), (2, 3, 3, 4)),
    Descriptor("InstanceNorm", lambda: fnn.InstanceNorm(start_axis=-3), (2, 3, 3, 4)),
    Descriptor("InstanceNorm1D-no-affine",
               lambda: fnn.InstanceNorm(start_axis=-2, use_scale=False, use_bias=False),
               (2, 5, 3)),
    Descriptor("SimpleRNN", lambda: fnn.SimpleRNN(4), (2, 5, 3)),
    Descriptor("RNN-simple-cell-lengths", lambda: fnn.RNN(fnn.SimpleRNNCell(4)), (2, 5, 3),
               side=_lengths),
    Descriptor("LSTM", lambda: fnn.LSTM(4), (2, 5, 3)),
    Descriptor("LSTM-stack-lengths-dropout",
               lambda: fnn.serial(fnn.LSTM(4), fnn.Dropout(0.2), fnn.LSTM(3)), (2, 5, 3),
               stochastic=True, side=_lengths),
    Descriptor("GRU", lambda: fnn.GRU(4, reverse=True), (2, 5, 3)),
    Descriptor("Bidirectional", lambda: fnn.Bidirectional(fnn.LSTMCell(4), fnn.GRUCell(3)),
               (2, 5, 3), side=_lengths),
    Descriptor("MultiHeadAttention", lambda: fnn.MultiHeadAttention(2), (2, 5, 8)),
    Descriptor("MultiHeadAttention-gqa-causal-rope",
               lambda: fnn.MultiHeadAttention(4, num_kv_heads=2, causal=True, rope=True,
                                              use_bias=True), (2, 5, 8)),
    Descriptor("MultiHeadAttention-window-alibi-lengths",
               lambda: fnn.MultiHeadAttention(2, causal=True, window=(2, 0), alibi=True), (2, 5, 8),
               side=_lengths),
    Descriptor("MultiHeadAttention-cross",
               lambda: fnn.MultiHeadAttention(2, cross=True), (2, 5, 8), side=_memory),
    Descriptor("MultiHeadAttention-dropout",
               lambda: fnn.MultiHeadAttention(2, dropout=0.2, causal=True), (2, 5, 8),
               stochastic=True),
    Descriptor("FeedForward", lambda: fnn.FeedForward(16), (3, 8)),
    Descriptor("FeedForward-swiglu", lambda: fnn.FeedForward(16, activation="swiglu",
                                                             out_features=4, use_bias=False),
               (3, 2, 8)),
    Descriptor("EncoderBlock", lambda: fnn.EncoderBlock(2, 16), (2, 5, 8)),
    Descriptor("EncoderBlock-rms-gqa-rope-causal-swiglu",
               lambda: fnn.EncoderBlock(4, 16, num_kv_heads=2, norm="rms", rope=True, causal=True,
                                        activation="swiglu", use_bias=False), (2, 5, 8)),
    Descriptor("DecoderBlock", lambda: fnn.DecoderBlock(2, 16, rope=True), (2, 5, 8)),
    Descriptor("EncoderBlock-post-norm", lambda: fnn.EncoderBlock(2, 16, norm_first=False),
               (2, 5, 8), side=_lengths),
    Descriptor("DecoderBlock-cross-lengths",
               lambda: fnn.DecoderBlock(2, 16, cross=True, activation="gelu_tanh"), (2, 5, 8),
               side=lambda x: _memory(x) | _lengths(x)),
    Descriptor("EncoderBlock-lengths", lambda: fnn.EncoderBlock(2, 16), (2, 5, 8), side=_lengths),
    Descriptor("BatchNorm-lengths", lambda: fnn.BatchNorm(momentum=0.9), (3, 5, 4),
               batch_stats=True, side=_lengths),
    Descriptor("GlobalAvgPool-lengths", lambda: fnn.GlobalAvgPool(-2), (3, 5, 4), side=_lengths),
    Descriptor("GlobalMaxPool-lengths", lambda: fnn.GlobalMaxPool(-2), (3, 5, 4), side=_lengths),
    Descriptor("LearnedPositionEmbedding", lambda: fnn.LearnedPositionEmbedding(8), (2, 5, 4)),
    Descriptor("LearnedPositionEmbedding-positions", lambda: fnn.LearnedPositionEmbedding(8),
               (2, 5, 4),
               side=lambda x: {"positions": jnp.broadcast_to(2 + jnp.arange(x.shape[1]),
                                                             x.shape[:2])}),
    Descriptor("SinusoidalPositionEmbedding", lambda: fnn.SinusoidalPositionEmbedding(8),
               (2, 5, 4)),
    Descriptor("SpectralNorm-dense", lambda: fnn.SpectralNorm(fnn.Dense(4)), (3, 5)),
    Descriptor("SpectralNorm-conv-iterations",
               lambda: fnn.SpectralNorm(fnn.Conv(4, (3, 3)), num_iterations=2), (2, 5, 5, 3)),
    Descriptor("SpectralNorm-conv-transpose",
               lambda: fnn.SpectralNorm(fnn.ConvTranspose(3, (2, 2), strides=2)), (2, 3, 3, 2)),
    Descriptor("WeightNorm-dense", lambda: fnn.WeightNorm(fnn.Dense(4)), (3, 5)),
    Descriptor("WeightNorm-conv", lambda: fnn.WeightNorm(fnn.Conv(4, (3, 3), use_bias=False)),
               (2, 5, 5, 3)),
    Descriptor("TimestepEmbedding", lambda: fnn.TimestepEmbedding(8, frequency_features=6),
               (3,), ints=50),  # small angles: jit and eager round sin alike
    Descriptor("TimestepEmbedding-float-gelu",
               lambda: fnn.TimestepEmbedding(4, hidden_features=8, activation="gelu"), (3,)),
    # random params: FiLM starts as the identity
    Descriptor("FiLM", lambda: fnn.FiLM(w_init=jax.nn.initializers.lecun_normal(),
                                        b_init=jax.nn.initializers.normal(1.0)),
               (2, 4, 4, 3), make_input=_film_input),
    Descriptor("repeat", lambda: fnn.repeat(fnn.serial(fnn.Dense(5), fnn.Gelu()), 3), (3, 5)),
    Descriptor("lora", lambda: fnn.lora(fnn.serial(fnn.Dense(6), fnn.Relu(), fnn.Dense(3)),
                                        rank=2, alpha=4.0), (3, 5)),
    Descriptor("lora-repeat-attention",
               lambda: fnn.lora(fnn.repeat(fnn.EncoderBlock(2, 16), 2), "**/attention/*",
                                rank=2), (2, 5, 8), side=_lengths),
    Descriptor("repeat-encoder-remat",
               lambda: fnn.repeat(fnn.EncoderBlock(2, 16, dropout=0.1), 2, remat=True),
               (2, 5, 8), stochastic=True),
    Descriptor("repeat-decoder-cross-seq",
               lambda: fnn.repeat(fnn.DecoderBlock(2, 16, cross=True), 2), (2, 5, 8),
               side=lambda x: _memory(x) | _lengths(x)),
    Descriptor("serial", lambda: fnn.serial(fnn.Dense(8), fnn.Relu(), head=fnn.Dense(3)), (3, 5)),
    Descriptor("branch-concat", lambda: fnn.branch(fnn.Dense(2), fnn.Tanh()), (3, 5)),
    Descriptor("branch-add", lambda: fnn.branch(fnn.Dense(5), fnn.Identity(), combine="add"),
               (3, 5)),
    Descriptor("residual", lambda: fnn.residual(fnn.serial(fnn.Dense(5), fnn.Gelu())), (3, 5)),
    Descriptor("residual-shortcut", lambda: fnn.residual(fnn.Dense(4), fnn.Dense(4)), (3, 5)),
    Descriptor("named", lambda: fnn.named("encoder", fnn.Dense(3)), (3, 5)),
    Descriptor("tied", lambda: fnn.tied(fnn.Embedding(9, 4), fnn.Dense(4)), (3, 6), ints=9),
    Descriptor("MLP", lambda: MLP([8, 8], 3, dropout=0.2), (3, 5), stochastic=True),
    Descriptor("LeNet", lambda: LeNet(10, features=(4, 8), kernel_size=3, hidden_features=16,
                                      dropout=0.5), (2, 8, 8, 1), stochastic=True),
    Descriptor("CharLSTM", lambda: fnn.models.CharLSTM(11, embedding_features=4, features=8),
               (2, 6), ints=11),
    Descriptor("CharLSTM-lengths", lambda: fnn.models.CharLSTM(11, embedding_features=4,
                                                               features=8),
               (2, 6), ints=11, side=_lengths),
    Descriptor("GPT", lambda: fnn.models.GPT(11, features=8, num_heads=2, num_layers=2,
                                             hidden_features=16, max_length=8), (2, 6), ints=11),
    Descriptor("GPT-tied-gelu-tanh-rms",
               lambda: fnn.models.GPT(11, features=8, num_heads=2, num_layers=1,
                                      hidden_features=16, max_length=8, tie_embeddings=True,
                                      activation="gelu_tanh", norm="rms", norm_epsilon=1e-5),
               (2, 6), ints=11, side=_lengths),
    Descriptor("ViT", lambda: fnn.models.ViT(10, patch_size=4, features=8, num_heads=2,
                                             num_layers=1, hidden_features=16), (2, 8, 8, 1)),
    Descriptor("TransformerClassifier",
               lambda: fnn.models.TransformerClassifier(11, 3, features=8, num_heads=2,
                                                        num_layers=1, hidden_features=16,
                                                        max_length=8),
               (2, 6), ints=11),
    Descriptor("TransformerClassifier-lengths",
               lambda: fnn.models.TransformerClassifier(11, 3, features=8, num_heads=2,
                                                        num_layers=1, hidden_features=16,
                                                        max_length=8),
               (2, 6), ints=11, side=_lengths),
    Descriptor("ResNet-basic", lambda: ResNet((1, 1), num_classes=3, features=4, stem="small"),
               (2, 8, 8, 1), batch_stats=True),
    Descriptor("ResNet-bottleneck", lambda: ResNet((1, 1), block="bottleneck", num_classes=3,
                                                   features=4), (2, 16, 16, 3), batch_stats=True),
    Descriptor("DCGANGenerator", lambda: fnn.models.DCGANGenerator(8, features=4), (2, 8),
               batch_stats=True),
    Descriptor("DCGANDiscriminator", lambda: fnn.models.DCGANDiscriminator(features=4),
               (2, 8, 8, 1), batch_stats=True),
    Descriptor("DCGANDiscriminator-spectral-norm",
               lambda: fnn.models.DCGANDiscriminator(image_size=4, channels=3, features=4,
                                                     spectral_norm=True), (2, 4, 4, 3)),
    # one U-Net (the slowest descriptor to compile): labels, dropout, float timesteps
    Descriptor("UNet-labels-dropout-float-t",
               lambda: fnn.models.UNet(channels=2, features=8, num_heads=2, num_groups=4,
                                       num_classes=3, dropout=0.2, time_features=16),
               (3, 8, 8, 2), stochastic=True,
               make_input=_unet_input((3, 8, 8, 2), labels=3, float_t=True)),
    Descriptor("remat", lambda: remat(fnn.serial(fnn.Dense(8), fnn.Gelu(), fnn.Dropout(0.2),
                                                 fnn.Dense(5))), (3, 5), stochastic=True),
    Descriptor("remat-dots-batchnorm",
               lambda: remat(fnn.serial(fnn.Dense(4), fnn.BatchNorm(momentum=0.9)),
                             policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False),
               (4, 5), batch_stats=True),
    # bfloat16 outputs, which test_bfloat16_inputs_run_in_bfloat16 asks of every layer; float32
    # compute, as jit and eager round bfloat16 intermediates differently (by one bfloat16 ulp,
    # beyond this table's tolerances). bfloat16 compute is tested in test_precision.py.
    Descriptor("with_policy-bfloat16-output",
               lambda: with_policy(fnn.serial(fnn.Dense(8), fnn.LayerNorm(), fnn.Gelu(),
                                              fnn.Dense(3)),
                                   Policy(compute_dtype=jnp.float32, output_dtype=jnp.bfloat16)),
               (3, 5)),
]


# Every test of one descriptor runs on the same xdist worker (loadgroup, see pyproject.toml), so
# the functions below are built and compiled once per descriptor and shared by its tests.
def _parametrize(fn):
    return pytest.mark.parametrize(
        "d", [pytest.param(d, id=str(d), marks=pytest.mark.xdist_group(str(d)))
              for d in DESCRIPTORS])(fn)


@functools.lru_cache(maxsize=None)
def _setup(d: Descriptor):
    """The layer, its params and state (initialised once), and the input."""
    layer = d.make()
    x = _input(d)
    params, state = layer.init(jax.random.key(0), as_spec(x))
    return layer, params, state, x


@functools.lru_cache(maxsize=None)
def _jitted_apply(d: Descriptor, train: bool):
    """``(params, state, x, key) -> (y, state)`` jitted, shared by the tests of ``d``."""
    layer = _setup(d)[0]
    return jax.jit(lambda p, s, x, k: layer.apply(p, s, x, key=k, train=train))


@functools.lru_cache(maxsize=None)
def _jitted_grad(d: Descriptor):
    """The gradient of a training-mode loss with respect to the params (and the input's arrays
    when all are floating: a Seq's lengths and a tuple with timesteps or labels are not
    differentiated), jitted; shared by the tests of ``d``."""
    layer, _, _, x = _setup(d)
    floating = all(jnp.issubdtype(a.dtype, jnp.floating) for a in jax.tree.leaves(_array(x)))

    def loss(params, state, array, key):
        given = x.with_x(array) if isinstance(x, fnn.Seq) else array
        y, new_state = layer.apply(params, state, given, key=key, train=True)
        return jnp.sum(jnp.square(_array(y).astype(jnp.float32))), new_state

    return jax.jit(jax.grad(loss, argnums=(0, 2) if floating else 0, has_aux=True))


def _key(train: bool):
    return jax.random.key(3) if train else None


def _assert_trees_close(a, b, **tol):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u, np.float32),
                                                         np.asarray(v, np.float32), **tol), a, b)


@_parametrize
@pytest.mark.parametrize("train", [False, True])
def test_jit_equals_eager(d, train):
    layer, params, state, x = _setup(d)
    eager = layer.apply(params, state, x, key=_key(train), train=train)
    jitted = _jitted_apply(d, train)(params, state, x, _key(train))
    _assert_trees_close(eager, jitted, rtol=1e-5, atol=1e-6)


@_parametrize
def test_vmap_over_examples_equals_batched_call(d):
    layer, params, state, x = _setup(d)
    # Training-mode layers that mix examples (BatchNorm) are compared in evaluation mode;
    # stochastic layers with one key shared by all examples would draw different masks, so
    # they too are compared in evaluation mode.
    batched, _ = _jitted_apply(d, False)(params, state, x, None)
    per_example = jax.jit(jax.vmap(lambda x: layer.apply(params, state, x)[0]))(x)
    _assert_trees_close(per_example, batched, rtol=1e-5, atol=1e-6)


@_parametrize
def test_gradients_are_finite_and_nonzero(d):
    _, params, state, x = _setup(d)
    grads, _ = _jitted_grad(d)(params, state, _array(x), jax.random.key(3))
    leaves = jax.tree.leaves(grads)
    assert leaves, "no gradient leaves"
    for g in leaves:
        assert np.all(np.isfinite(np.asarray(g)))
    assert any(np.any(np.asarray(g) != 0) for g in leaves)


@_parametrize
@pytest.mark.parametrize("train", [False, True])
def test_eval_shape_agrees_with_apply(d, train):
    layer, params, state, x = _setup(d)
    apply = lambda p, s, x: layer.apply(p, s, x, key=_key(train), train=train)  # noqa: E731
    spec = jax.eval_shape(apply, params, state, x)
    real = _jitted_apply(d, train)(params, state, x, _key(train))
    assert jax.tree.structure(spec) == jax.tree.structure(real)
    for s, r in zip(jax.tree.leaves(spec), jax.tree.leaves(real)):
        assert (s.shape, s.dtype) == (r.shape, r.dtype)
    # state comes back with the structure it went in with
    assert jax.tree.structure(real[1]) == jax.tree.structure(state)


@pytest.mark.parametrize("d", [pytest.param(d, id=str(d), marks=pytest.mark.xdist_group(str(d)))
                               for d in DESCRIPTORS if not d.ints])
def test_bfloat16_inputs_run_in_bfloat16(d):
    _, params, state, x32 = _setup(d)
    apply = _jitted_apply(d, False)
    y16, y32 = (_array(apply(params, state, x, None)[0])
                for x in (_cast(x32, jnp.bfloat16), x32))
    assert y16.dtype == jnp.bfloat16
    assert y16.shape == y32.shape
    y16 = np.asarray(y16, np.float32)
    assert np.all(np.isfinite(y16))
    scale = max(1.0, float(np.max(np.abs(np.asarray(y32)))))
    np.testing.assert_allclose(y16, np.asarray(y32), atol=0.1 * scale, rtol=0.1)


@_parametrize
def test_jitted_step_does_not_recompile(d):
    # a train step: gradients, and the new state fed back into the next call
    _, params, state, x = _setup(d)
    grad = _jitted_grad(d)
    _, state = grad(params, state, _array(x), jax.random.key(1))
    # new values of the same shapes: new params, the state the step returned, a new input and
    # key; a layer whose state changed dtype or structure would compile again
    params = jax.tree.map(lambda p: p * 1.5, params)
    grads, _ = grad(params, state, _array(_input(d, seed=2)), jax.random.key(2))
    assert grad._cache_size() == 1
    jax.block_until_ready(grads)


def test_every_public_layer_has_a_descriptor():
    covered = {d.name.split("-")[0].rstrip("123D") for d in DESCRIPTORS}
    covered |= {"Identity", "Relu", "Relu6", "LeakyRelu", "Elu", "Celu", "Selu", "Gelu", "Silu",
                "Mish", "Tanh", "HardTanh", "Sigmoid", "Softplus"}  # the activation-* rows
    covered |= {"SimpleRNNCell", "LSTMCell", "GRUCell"}  # run by the RNN and layer rows
    factories = {name: getattr(fnn, name) for name in fnn.layers.__all__}
    public = {name for name, obj in factories.items()  # layer factories, not types or tables
              if name[0].isupper() and callable(obj) and not isinstance(obj, type)}
    public |= {"serial", "branch", "residual", "named", "tied", "repeat", "lora"}

    assert public <= covered, f"layers without a descriptor: {public - covered}"


@pytest.mark.parametrize("d", DESCRIPTORS, ids=str)
def test_every_layer_documents_its_shapes(d):
    if d.name.startswith("activation-"):
        factory = ACTIVATIONS[d.name.split("-", 1)[1]]
    else:
        name = d.name.split("-")[0].rstrip("123D")
        factory = getattr(fnn, name, None) or getattr(fnn.models, name)
    doc = factory.__doc__ or ""
    assert "->" in doc or "[" in doc, f"{factory.__name__} has no shapes in its docstring"
