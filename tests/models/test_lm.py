"""The language models (CharLSTM, GPT), their decode modes and generation. Tiny sizes: the whole
file runs in seconds on a CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.data.text import load_text, sequence_batches
from fnn.models.lm import CharLSTM, GPT, generate, init_gpt_cache, init_lstm_carry
from fnn.train import create_train_state, make_eval_step, make_train_step

V = 13


def tiny_gpt(**kw):
    return GPT(V, **{**dict(features=16, num_heads=2, num_layers=2, hidden_features=32,
                            max_length=16), **kw})


def tiny_lstm(**kw):
    return CharLSTM(V, **{**dict(embedding_features=8, features=16, num_layers=2), **kw})


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


@pytest.fixture(scope="module")
def corpus():
    return load_text()


# ----------------------------------------------------------------------------- models
# Shapes are checked with jax.eval_shape (no compilation); numerics run under jit, one
# compilation per model, so the file stays fast on a small shared CPU.

@functools.lru_cache(maxsize=None)
def jitted(model):
    return jax.jit(lambda p, s, x: model.apply(p, s, x))


def test_char_lstm_shapes():
    model = tiny_lstm()
    ids = jax.ShapeDtypeStruct((2, 3, 7), jnp.int32)
    params, state = jax.eval_shape(model.init, jax.random.key(0), ids)
    assert shapes(params) == {
        "embed": {"table": (V, 8)},
        "lstm1": {"w_i": (8, 64), "w_h": (16, 64), "b": (64,)},
        "lstm2": {"w_i": (16, 64), "w_h": (16, 64), "b": (64,)},
        "head": {"w": (16, V), "b": (V,)}}
    assert state == {}
    logits, _ = jax.eval_shape(model.apply, params, state, ids)
    assert logits.shape == (2, 3, 7, V) and logits.dtype == jnp.float32
    one = jax.ShapeDtypeStruct((7,), jnp.int32)  # no batch axis
    assert jax.eval_shape(model.apply, params, state, one)[0].shape == (7, V)


@pytest.mark.parametrize("tie", [False, True])
def test_gpt_shapes(tie):
    model = tiny_gpt(tie_embeddings=tie)
    ids = jax.ShapeDtypeStruct((3, 10), jnp.int32)
    params, state = jax.eval_shape(model.init, jax.random.key(0), ids)
    assert sorted(params) == sorted(["blocks", "embed", "norm", "position"]
                                    + ([] if tie else ["head"]))
    assert shapes(params["embed"]) == {"table": (V, 16)}
    assert shapes(params["position"]) == {"table": (16, 16)}
    assert shapes(params["blocks"]["layers"]["ffn"]["up"]) == {"w": (2, 16, 32), "b": (2, 32)}
    assert sorted(params["blocks"]["layers"]) == ["attention", "ffn", "norm1", "norm2"]
    if not tie:
        assert shapes(params["head"]) == {"w": (16, V), "b": (V,)}
    assert state == {}
    logits, _ = jax.eval_shape(model.apply, params, state, ids)
    assert logits.shape == (3, 10, V)
    with pytest.raises(fnn.ShapeError, match="max_length=16"):
        jax.eval_shape(model.apply, params, state, jax.ShapeDtypeStruct((3, 17), jnp.int32))


@pytest.fixture(scope="module")
def gpt():
    model = tiny_gpt()
    params, state = jax.jit(model.init)(jax.random.key(3), jnp.zeros((2, 4), jnp.int32))
    # random params at a larger scale: logits spread out, so greedy choices vary
    return model, jax.tree.map(lambda p: p * 3.0, params), state


@pytest.fixture(scope="module")
def lstm():
    model = tiny_lstm()
    params, state = jax.jit(model.init)(jax.random.key(3), jnp.zeros((2, 4), jnp.int32))
    return model, jax.tree.map(lambda p: p * 3.0, params), state


def test_gpt_is_causal(gpt):
    model, params, state = gpt
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 10)), jnp.int32)
    changed = ids.at[:, 5:].set((ids[:, 5:] + 3) % V)
    a, _ = jitted(model)(params, state, ids)
    b, _ = jitted(model)(params, state, changed)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-4)
    assert not np.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def assert_decode_mode_matches_full_pass(model, params, state, decode):
    """Decode mode on 7 tokens, then 3 single tokens, equals one full pass on all 10."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 10)), jnp.int32)
    full, _ = jitted(model)(params, state, ids)
    first, decode = model.apply(params, decode, ids[:, :7])
    step = jax.jit(model.apply)
    rest = []
    for t in range(7, 10):
        y, decode = step(params, decode, ids[:, t:t + 1])
        rest.append(y)
    np.testing.assert_allclose(jnp.concatenate([first] + rest, axis=1), full, atol=1e-4)
    return decode


def test_gpt_cached_apply_matches_full_pass(gpt):
    model, params, state = gpt
    cache = assert_decode_mode_matches_full_pass(model, params, state,
                                                 init_gpt_cache(params, (2,)))
    assert int(cache["blocks"]["layers"]["attention"]["cache"]["index"][0]) == 10


def test_lstm_decode_mode_matches_full_pass(lstm):
    model, params, state = lstm
    carry = assert_decode_mode_matches_full_pass(model, params, state,
                                                 init_lstm_carry(params, (2,)))
    assert sorted(carry["carry"]) == ["lstm1", "lstm2"]


DECODE_STATE = {"gpt": init_gpt_cache, "lstm": init_lstm_carry}


def greedy_full_forward(model, params, state, prompt, num_tokens):
    """Greedy decoding that re-runs the whole forward pass on the growing sequence."""
    seq = prompt
    for _ in range(num_tokens):
        logits, _ = jitted(model)(params, state, seq)
        seq = jnp.concatenate([seq, jnp.argmax(logits[..., -1:, :], -1).astype(jnp.int32)], -1)
    return seq


@pytest.mark.parametrize("which", ["gpt", "lstm"])
def test_generate_greedy_matches_full_forward(which, request):
    model, params, state = request.getfixturevalue(which)
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, V, (2, 4)), jnp.int32)
    expected = greedy_full_forward(model, params, state, prompt, 5)
    assert len(set(np.asarray(expected[:, 4:]).ravel().tolist())) > 1  # not a constant output
    decode = DECODE_STATE[which](params, (2,))
    out = generate(model, params, decode, prompt, 5, key=jax.random.key(0), temperature=0.0)
    assert out.shape == (2, 9) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[:, :4], prompt)
    # top_k=1 is greedy whatever the temperature
    top1 = generate(model, params, decode, prompt, 5, key=jax.random.key(5), temperature=1.0,
                    top_k=1)
    np.testing.assert_array_equal(top1, expected)


def test_generate_sampling_and_errors(gpt):
    model, params, _ = gpt
    state = init_gpt_cache(params, (2,))
    prompt = jnp.zeros((2, 4), jnp.int32)
    a = generate(model, params, state, prompt, 5, key=jax.random.key(1), temperature=1.0, top_k=4)
    b = generate(model, params, state, prompt, 5, key=jax.random.key(1), temperature=1.0, top_k=4)
    np.testing.assert_array_equal(a, b)  # reproducible from the key
    assert a.shape == (2, 9) and int(a.min()) >= 0 and int(a.max()) < V
    assert generate(model, params, state, prompt, 0, key=jax.random.key(1)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"^generate: the prompt's ids must lie in the model's "
                                         r"vocabulary \[0, 13\), got 13$"):
        generate(model, params, state, prompt.at[1, 2].set(V), 2, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"state must be the model's decode state .*"
                                         r"init_gpt_cache\(params, batch_shape\)"):
        generate(model, params, {}, prompt, 2, key=jax.random.key(1))
    with pytest.raises(TypeError, match="model must be a Layer"):
        generate(model.apply, params, state, prompt, 2, key=jax.random.key(1))


def test_generate_past_max_length_slides_a_window_over_the_last_max_length_tokens(gpt):
    # max_length 16: tokens 4..16 come from the cache, every later one from a full pass over
    # the 16 tokens before it (positions counted from the window's start)
    model, params, _ = gpt
    prompt = jnp.asarray(np.random.default_rng(5).integers(0, V, (2, 4)), jnp.int32)
    out = generate(model, params, init_gpt_cache(params, (2,)), prompt, 20,
                   key=jax.random.key(0), temperature=0.0)
    assert out.shape == (2, 24)
    ids = np.asarray(prompt)
    for t in range(4, 24):  # greedy decoding by hand, one full pass per token
        window = ids[:, max(0, t - 16):t]
        logits, _ = jitted(model)(params, {}, jnp.asarray(window))
        ids = np.concatenate([ids, np.asarray(logits[:, -1].argmax(-1))[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)
    # a prompt longer than max_length starts in the window at once
    long_prompt = jnp.asarray(np.random.default_rng(6).integers(0, V, (2, 20)), jnp.int32)
    out = generate(model, params, init_gpt_cache(params, (2,)), long_prompt, 3,
                   key=jax.random.key(0), temperature=0.0)
    logits, _ = jitted(model)(params, {}, long_prompt[:, -16:])
    np.testing.assert_array_equal(out[:, 20], logits[:, -1].argmax(-1))


def test_an_id_outside_the_vocabulary_under_jit_changes_no_earlier_position(gpt):
    model, params, state = gpt
    ids = jnp.asarray(np.random.default_rng(8).integers(0, V, (2, 8)), jnp.int32)
    good, _ = jitted(model)(params, state, ids)
    bad, _ = jitted(model)(params, state, ids.at[:, 4].set(V + 86))  # no error possible here
    np.testing.assert_array_equal(bad[:, :4], good[:, :4])
    assert np.all(np.isfinite(np.asarray(bad)))


def test_a_huge_value_at_a_position_changes_no_output_before_it():
    # masked (future) positions carry no information backwards, also when their values are huge
    block = fnn.DecoderBlock(2, 16)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 6, 8)), jnp.float32)
    params, state = block.init(jax.random.key(0), x)
    base, _ = block.apply(params, state, x)
    for t in (2, 5):
        poked, _ = block.apply(params, state, x.at[:, t].set(1e30))
        np.testing.assert_array_equal(poked[:, :t], base[:, :t])
    mha = fnn.MultiHeadAttention(2, causal=True)
    mp, ms = mha.init(jax.random.key(1), x)
    base, _ = mha.apply(mp, ms, x)
    poked, _ = mha.apply(mp, ms, x.at[:, 3].set(1e30))
    np.testing.assert_array_equal(poked[:, :3], base[:, :3])


@pytest.mark.parametrize("make", [
    lambda v: CharLSTM(v, embedding_features=16, features=32),
    lambda v: GPT(v, features=32, num_heads=2, num_layers=1, hidden_features=64, max_length=32),
], ids=["lstm", "gpt"])
def test_training_reduces_loss(corpus, make):
    model = make(corpus.vocab.size)
    batches = sequence_batches(corpus.train[:20_000], 16, 32, seed=0)
    x0, y0 = next(batches)
    optimizer = optax.adam(1e-2)
    ts = create_train_state(model, optimizer, jax.random.key(0), x0)
    step = make_train_step(model, optimizer, fnn.losses.softmax_cross_entropy)
    evaluate = make_eval_step(model, fnn.losses.softmax_cross_entropy)
    before = float(evaluate(ts.params, ts.state, x0, y0)["loss"])
    for _ in range(25):
        x, y = next(batches)
        ts, _ = step(ts, x, y)
    after = float(evaluate(ts.params, ts.state, x0, y0)["loss"])
    assert after < before - 0.5, (before, after)
