"""The transformer classifiers: ViT on images and TransformerClassifier on token ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.models.vit import TransformerClassifier, ViT


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_vit_digits_shaped():
    model = ViT(10, patch_size=4, features=16, num_heads=2, num_layers=2, hidden_features=32)
    x = jnp.asarray(np.random.default_rng(0).random((5, 8, 8, 1)), jnp.float32)
    labels = jnp.arange(5, dtype=jnp.int32)
    params, state = jax.jit(model.init)(jax.random.key(0), x)
    assert shapes(params["patches"]) == {"w": (4, 4, 1, 16), "b": (16,)}
    assert shapes(params["position"]) == {"table": (4, 16)}
    assert shapes(params["head"]) == {"w": (16, 10), "b": (10,)}

    def loss(p):
        logits, _ = model.apply(p, state, x)
        return fnn.losses.softmax_cross_entropy(logits, labels), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert logits.shape == (5, 10)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_vit_shapes_patch2_and_dropout():
    model = ViT(10, patch_size=2, features=8, num_heads=2, num_layers=1, hidden_features=16,
                dropout=0.1)
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    params, state = jax.eval_shape(model.init, jax.random.key(0), x)
    assert shapes(params["position"]) == {"table": (16, 8)}
    y, _ = jax.eval_shape(lambda p, s, x, k: model.apply(p, s, x, key=k, train=True),
                          params, state, x, jax.random.key(1))
    assert y.shape == (2, 10)
    one = jax.ShapeDtypeStruct((8, 8, 1), jnp.float32)  # no batch axis
    assert jax.eval_shape(model.apply, params, state, one)[0].shape == (10,)
    with pytest.raises(fnn.MissingKeyError):
        jax.eval_shape(lambda p, s, x: model.apply(p, s, x, train=True), params, state, x)


def test_transformer_classifier():
    model = TransformerClassifier(20, 3, features=8, num_heads=2, num_layers=2,
                                  hidden_features=16, max_length=12)
    ids = jax.ShapeDtypeStruct((4, 12), jnp.int32)
    params, state = jax.eval_shape(model.init, jax.random.key(0), ids)
    assert sorted(params) == ["blocks", "embed", "head", "norm", "position"]
    assert shapes(params["position"]) == {"table": (12, 8)}
    assert jax.eval_shape(model.apply, params, state, ids)[0].shape == (4, 3)
    short = jax.ShapeDtypeStruct((4, 7), jnp.int32)
    assert jax.eval_shape(model.apply, params, state, short)[0].shape == (4, 3)


def test_vit_refuses_a_patch_size_that_does_not_divide_the_image():
    model = ViT(10, patch_size=3, features=8, num_heads=2, num_layers=1, hidden_features=16)
    with pytest.raises(fnn.ShapeError, match=r"^PatchEmbedding at patches: expected input "
                                             r"\[\.\.\., H, W, C\] with H and W multiples of "
                                             r"patch_size=3, got float32\[2, 8, 8, 1\]$"):
        model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
