"""find_nonfinite: naming the input, parameter, layer or gradient where a step goes non-finite."""

import jax
import jax.numpy as jnp
import pytest

import fnn
from fnn.combinators import remat
from fnn.inspection import record_layers
from fnn.losses import mean_squared_error, softmax_cross_entropy
from fnn.train.debug import find_nonfinite


def _setup(model, shape=(4, 5), num_classes=3, seed=0):
    x = jax.random.normal(jax.random.key(seed + 1), shape)
    y = jnp.arange(shape[0], dtype=jnp.int32) % num_classes
    params, state = model.init(jax.random.key(seed), x)
    return params, state, x, y


def _divide_by_zero():
    return fnn.Lambda(lambda x: x / 0.0, "divide_by_zero")


def _sqrt_relu():
    return fnn.Lambda(lambda x: jnp.sqrt(jnp.maximum(x, 0.0)), "sqrt_relu")


def _mlp():
    return fnn.serial(fnn.Dense(4), fnn.Relu(), head=fnn.Dense(3))


def test_all_finite_is_none():
    model = fnn.serial(fnn.Dense(4), fnn.BatchNorm(), fnn.Relu(), fnn.Dropout(0.5), fnn.Dense(3))
    params, state, x, y = _setup(model)
    assert find_nonfinite(model, params, state, x, y, softmax_cross_entropy,
                          key=jax.random.key(1)) is None
    assert find_nonfinite(model, params, state, x, y, softmax_cross_entropy, train=False) is None


def test_nan_in_the_input_batch_or_targets():
    model = _mlp()
    params, state, x, y = _setup(model)
    bad_x = x.at[1, 2].set(jnp.nan)
    assert find_nonfinite(model, params, state, bad_x, y, softmax_cross_entropy) == (
        "the input batch has NaN (1 of 20 values)")
    pair = fnn.Lambda(lambda xs: xs[0] * xs[1])
    assert find_nonfinite(pair, {}, {}, (x, x.at[0, 0].set(jnp.inf)), x, mean_squared_error) == (
        "the input batch entry [1] has inf (1 of 20 values)")
    targets = jnp.zeros((4, 3)).at[0].set(jnp.nan)
    assert find_nonfinite(model, params, state, x, targets, mean_squared_error) == (
        "the target batch has NaN (3 of 12 values)")


def test_layer_producing_inf_in_the_middle_is_named_by_its_path():
    model = fnn.serial(fnn.Dense(4), encoder=fnn.serial(fnn.Dense(4), _divide_by_zero(),
                                                        fnn.Tanh()), head=fnn.Dense(3))
    params, state, x, y = _setup(model)
    message = find_nonfinite(model, params, state, x, y, softmax_cross_entropy)
    # every layer after it (head, the encoder around it) is non-finite too; the first is named
    assert message.startswith("the output of divide_by_zero at encoder/1 has inf"), message
    assert "the first layer, in forward order, whose output is not finite" in message


def test_non_finite_output_inside_remat_and_repeat_is_named_by_its_own_path_and_copy():
    # layers inside jax.checkpoint (remat) and lax.scan (repeat) are captured as values
    model = fnn.serial(fnn.Dense(4), remat(fnn.serial(fnn.Dense(4), _divide_by_zero())),
                       fnn.Dense(3))
    params, state, x, y = _setup(model)
    message = find_nonfinite(model, params, state, x, y, softmax_cross_entropy)
    assert message.startswith("the output of divide_by_zero at 1/1 has inf"), message

    # float32 overflows in the second copy's scale; the third copy's Dense (which completes
    # earlier in the body) is non-finite too, but runs later
    scale = fnn.Lambda(lambda x: x * 1e30, "scale")
    model = fnn.serial(fnn.Dense(4), blocks=fnn.repeat(fnn.serial(fnn.Dense(4), scale), 3))
    params, state, x, y = _setup(model)
    message = find_nonfinite(model, params, state, x, y, softmax_cross_entropy)
    assert message.startswith("the output of scale at blocks/layers/1 (in copy 2 of the 3 of "
                              "repeat at blocks) has "), message


def test_nan_parameter_and_state_are_named_with_their_layer():
    model = _mlp()
    params, state, x, y = _setup(model)
    params["head"]["w"] = params["head"]["w"].at[0, 1].set(jnp.nan)
    assert find_nonfinite(model, params, state, x, y, softmax_cross_entropy) == (
        "the parameter params['head']['w'] (Dense at head) has NaN (1 of 12 values)")

    model = fnn.serial(fnn.Dense(4), fnn.BatchNorm())
    params, state, x, y = _setup(model)
    state["1"]["var"] = state["1"]["var"].at[2].set(jnp.inf)
    assert find_nonfinite(model, params, state, x, y, softmax_cross_entropy, train=False) == (
        "the state entry state['1']['var'] (BatchNorm at 1) has inf (1 of 4 values)")


def test_non_finite_output_of_the_model_itself():
    model = _divide_by_zero()  # no children: the model's own output is checked
    params, state, x, _ = _setup(model)
    assert find_nonfinite(model, params, state, x, x, mean_squared_error) == (
        "the output of the model (divide_by_zero) has inf (20 of 20 values)")


def test_non_finite_loss():
    model = _mlp()
    params, state, x, y = _setup(model)

    def log_of_negative(outputs, targets):
        return jnp.log(-jnp.mean(jnp.square(outputs)))

    message = find_nonfinite(model, params, state, x, y, log_of_negative)
    assert message.startswith("the loss is nan although the model's outputs and targets are "
                              "finite"), message


def test_non_finite_gradient_names_the_parameter_the_backward_pass_reaches_first():
    # sqrt is finite at 0, its derivative is not: sqrt(max(x, 0)) gives NaN (inf * 0) gradients
    # to the layers before it, none to the layer after it
    model = fnn.serial(fnn.Dense(4), _sqrt_relu(), fnn.Dense(3))
    params, state, x, y = _setup(model)
    message = find_nonfinite(model, params, state, x, y, softmax_cross_entropy)
    assert message.startswith("the gradient of params['0']['b'] (Dense at 0) has NaN"), message
    assert "(2 of 4 gradient arrays are not finite)" in message

    two = fnn.serial(fnn.Dense(4), fnn.Dense(4), _sqrt_relu(), fnn.Dense(3))
    params, state, x, y = _setup(two)
    message = find_nonfinite(two, params, state, x, y, softmax_cross_entropy)
    # the later layer's gradient is made first in the backward pass, nearer the sqrt
    assert message.startswith("the gradient of params['1']['b'] (Dense at 1) has NaN"), message


def test_find_nonfinite_checks_train_and_key():
    model = fnn.serial(fnn.Dense(4), fnn.Dropout(0.5))
    params, state, x, y = _setup(model)
    with pytest.raises(fnn.MissingKeyError, match="Dropout at 1 is stochastic"):
        find_nonfinite(model, params, state, x, y, softmax_cross_entropy)
    with pytest.raises(TypeError, match="train must be a Python bool"):
        find_nonfinite(model, params, state, x, y, softmax_cross_entropy, train=1)


def test_record_layers_lists_every_child_parent_first():
    model = fnn.serial(fnn.Dense(4), encoder=fnn.serial(fnn.Dense(3), fnn.Relu()))
    params, state, x, _ = _setup(model)
    with record_layers() as rows:
        y, _ = model.apply(params, state, x)
    assert [(row.path, row.name) for row in rows] == [
        ("0", "Dense"), ("encoder", "serial"), ("encoder/0", "Dense"), ("encoder/1", "Relu")]
    assert rows[-1].output is y and rows[2].params is params["encoder"]["0"]
    assert fnn.core._OBSERVERS.get() == ()  # recording stops with the block
