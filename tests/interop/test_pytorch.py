"""PyTorch state_dicts in and out (fnn.interop.pytorch), checked against torch on the CPU:
randomly initialised torch modules, their weights imported, outputs equal in float32 (1e-4
relative), in evaluation and, where it differs, in training; exported back, torch's
``load_state_dict(strict=True)`` takes them and gives the same outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.interop import WeightsError
from fnn.interop.pytorch import (FAMILIES, Rule, as_torch, export_hf_gpt2,
                                 export_torchvision_resnet, from_torch, import_hf_gpt2,
                                 import_torchvision_resnet, numpy_array, to_torch)

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[interop]')")
nn = torch.nn

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _close(fnn_out, torch_out, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(fnn_out), torch_out.detach().numpy(), rtol=rtol,
                               atol=atol)


def _close_logits(fnn_out, torch_out, rtol=RTOL):
    """Equal to ``rtol`` relative to the logits' scale (their largest magnitude): a deep
    network's small logits carry float32 rounding of the large ones."""
    expected = torch_out.detach().numpy()
    error = np.abs(np.asarray(fnn_out) - expected).max() / np.abs(expected).max()
    assert np.asarray(fnn_out).shape == expected.shape
    assert error <= rtol, f"largest difference {error:.2e} of the logits' scale"


def _roundtrip(module, layout, params, state, **options):
    """Exports the fnn trees back: the module's own entries, exactly (BatchNorm's step count
    aside, which fnn does not keep), and torch loads them strictly."""
    out = to_torch(params, state, layout, **options)
    assert sorted(out) == sorted(module.state_dict())
    for name, value in module.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(out[name], numpy_array(value), err_msg=name)
    module.load_state_dict(as_torch(out), strict=True)
    return out


def _x(*shape):
    return torch.randn(*shape)


def _nhwc(t):  # torch [N, C, *spatial] -> fnn [N, *spatial, C]
    return jnp.asarray(np.moveaxis(t.numpy(), 1, -1))


# ----------------------------------------------------------------------------- single layers


def test_linear_with_and_without_bias():
    for bias in (True, False):
        m = nn.Linear(5, 3, bias=bias)
        params, state = from_torch(m.state_dict(), {"fc": Rule("linear", "")})
        x = _x(4, 5)
        y, _ = fnn.Dense(3, use_bias=bias).apply(params["fc"], {}, jnp.asarray(x.numpy()))
        _close(y, m(x))
        _roundtrip(m, {"fc": Rule("linear", "")}, params, state)


@pytest.mark.parametrize("dims,groups,stride,padding,dilation", [
    (1, 1, 2, 1, 1), (2, 1, 1, 0, 1), (2, 2, 2, 1, 2), (2, 4, 1, 2, 1), (3, 1, 2, 1, 1)])
def test_conv(dims, groups, stride, padding, dilation):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    m = conv(4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    params, _ = from_torch(m.state_dict(), {"c": Rule("conv", "")})
    layer = fnn.Conv(8, (3,) * dims, strides=stride, padding=padding, dilation=dilation,
                     feature_group_count=groups)
    x = _x(2, 4, *(9,) * dims)
    y, _ = layer.apply(params["c"], {}, _nhwc(x))
    _close(y, torch.movedim(m(x), 1, -1))
    _roundtrip(m, {"c": Rule("conv", "")}, params, {})


@pytest.mark.parametrize("dims,stride,padding,output_padding,dilation", [
    (1, 2, 1, 1, 1), (2, 2, 1, 1, 1), (2, 3, 0, 2, 1), (2, 1, 1, 0, 2), (3, 2, 1, 0, 1)])
def test_conv_transpose(dims, stride, padding, output_padding, dilation):
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    m = conv(4, 6, 3, stride=stride, padding=padding, output_padding=output_padding,
             dilation=dilation)
    params, _ = from_torch(m.state_dict(), {"c": Rule("conv_transpose", "")})
    layer = fnn.ConvTranspose(6, (3,) * dims, strides=stride, dilation=dilation,
                              padding=[(padding, padding - output_padding)] * dims)
    x = _x(2, 4, *(5,) * dims)
    y, _ = layer.apply(params["c"], {}, _nhwc(x))
    expected = torch.movedim(m(x), 1, -1)
    assert y.shape == tuple(expected.shape)
    _close(y, expected)
    _roundtrip(m, {"c": Rule("conv_transpose", "")}, params, {})


@pytest.mark.parametrize("dims,groups,stride,padding,output_padding,dilation", [
    (1, 2, 2, 1, 1, 1), (2, 2, 2, 1, 1, 1), (2, 3, 3, 0, 2, 1), (2, 6, 1, 1, 0, 2),
    (3, 2, 2, 1, 0, 1)])
def test_conv_transpose_grouped(dims, groups, stride, padding, output_padding, dilation):
    """torch's weight [in, out / groups, *kernel] becomes fnn's [*kernel, in / groups, out]
    given the option groups, and is written back entry for entry."""
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    m = conv(12, 6, 3, stride=stride, padding=padding, output_padding=output_padding,
             dilation=dilation, groups=groups)
    layout = {"c": Rule("conv_transpose", "", {"groups": groups})}
    params, _ = from_torch(m.state_dict(), layout)
    assert params["c"]["w"].shape == (3,) * dims + (12 // groups, 6)
    layer = fnn.ConvTranspose(6, (3,) * dims, strides=stride, dilation=dilation,
                              padding=[(padding, padding - output_padding)] * dims,
                              feature_group_count=groups)
    x = _x(2, 12, *(4,) * dims)
    y, _ = layer.apply(params["c"], {}, _nhwc(x))
    _close(y, torch.movedim(m(x), 1, -1))
    _roundtrip(m, layout, params, {})
    # the same options given to from_torch and to_torch as keywords
    assert jax.tree.map(np.shape, from_torch(m.state_dict(), {"c": Rule("conv_transpose", "")},
                                             groups=groups)[0]) == jax.tree.map(np.shape, params)
    _roundtrip(m, {"c": Rule("conv_transpose", "")}, params, {}, groups=groups)


def test_conv_transpose_groups_must_divide_the_channels():
    m = nn.ConvTranspose2d(6, 4, 3, groups=2)
    with pytest.raises(WeightsError, match="groups must be a positive divisor of the weight's "
                                           "input channels 6, got 4"):
        from_torch(m.state_dict(), {"c": Rule("conv_transpose", "", {"groups": 4})})


def _trained_batch_norm(features, torch_momentum=0.1):
    m = nn.BatchNorm2d(features, momentum=torch_momentum)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        for _ in range(3):  # running statistics away from their initial 0 and 1
            m(torch.randn(8, features, 5, 5) * 3 + 1)
    return m


def test_batch_norm_eval_and_train():
    m = _trained_batch_norm(6)
    params, state = from_torch(m.state_dict(), {"bn": Rule("batch_norm", "")})
    layer = fnn.BatchNorm(momentum=0.9)
    x = _x(4, 6, 5, 5) * 2 + 0.5
    m.eval()
    y, _ = layer.apply(params["bn"], state["bn"], _nhwc(x))
    _close(y, torch.movedim(m(x), 1, -1))
    m.train()
    old_var = state["bn"]["var"]
    y, new_state = layer.apply(params["bn"], state["bn"], _nhwc(x), train=True)
    _close(y, torch.movedim(m(x), 1, -1))  # both normalise with the biased batch variance
    _close(new_state["mean"], m.running_mean)
    # torch updates its running variance with the unbiased batch variance: n / (n - 1) larger
    n = 4 * 5 * 5
    batch_var = (np.asarray(new_state["var"]) - 0.9 * old_var) / 0.1
    np.testing.assert_allclose(0.9 * old_var + 0.1 * batch_var * n / (n - 1),
                               m.running_var.numpy(), rtol=RTOL)
    m.eval()  # the statistics imported, not those of the training call above
    m.running_mean.copy_(torch.from_numpy(np.asarray(state["bn"]["mean"])))
    m.running_var.copy_(torch.from_numpy(np.asarray(state["bn"]["var"])))
    _roundtrip(m, {"bn": Rule("batch_norm", "")}, params, state)


def test_batch_norm_without_running_statistics_is_refused():
    m = nn.BatchNorm1d(3, track_running_stats=False)
    with pytest.raises(WeightsError, match="track_running_stats=False"):
        from_torch(m.state_dict(), {"bn": Rule("batch_norm", "")})


@pytest.mark.parametrize("kind", ["layer", "group", "rms"])
def test_feature_norms(kind):
    if kind == "layer":
        m, layer, x = nn.LayerNorm(8), fnn.LayerNorm(), _x(3, 4, 8)
    elif kind == "rms":
        m, layer, x = nn.RMSNorm(8, eps=1e-6), fnn.RMSNorm(epsilon=1e-6), _x(3, 4, 8)
    else:
        m, layer, x = nn.GroupNorm(4, 8), fnn.GroupNorm(4, start_axis=-3), _x(3, 8, 5, 5)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            m.bias.uniform_(-1, 1)
    rule = {"n": Rule(f"{kind}_norm", "")}
    params, _ = from_torch(m.state_dict(), rule)
    fnn_x = _nhwc(x) if kind == "group" else jnp.asarray(x.numpy())
    y, _ = layer.apply(params["n"], {}, fnn_x)
    _close(y, torch.movedim(m(x), 1, -1) if kind == "group" else m(x))
    _roundtrip(m, rule, params, {})


def test_embedding():
    m = nn.Embedding(11, 4)
    params, _ = from_torch(m.state_dict(), {"e": Rule("embedding", "")})
    ids = torch.tensor([[1, 2, 10], [0, 0, 3]])
    y, _ = fnn.Embedding(11, 4).apply(params["e"], {}, jnp.asarray(ids.numpy()))
    _close(y, m(ids))
    _roundtrip(m, {"e": Rule("embedding", "")}, params, {})


def _bidirectional_layout(kind: str, num_layers: int) -> dict[str, Rule]:
    return {f"{i}/{d}": Rule(kind, "", {"layer": i, "reverse": d == "backward"})
            for i in range(num_layers) for d in ("forward", "backward")}


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_two_layers_bidirectional(kind):
    torch_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
    cell = {"lstm": fnn.LSTMCell, "gru": fnn.GRUCell, "rnn": fnn.SimpleRNNCell}[kind]
    m = torch_cls(5, 6, num_layers=2, bidirectional=True, batch_first=True)
    with torch.no_grad():  # biases away from zero, so that the bias rules matter
        for name, p in m.named_parameters():
            if "bias" in name:
                p.uniform_(-1, 1)
    layout = _bidirectional_layout(kind, 2)
    params, state = from_torch(m.state_dict(), layout)
    model = fnn.serial(fnn.Bidirectional(cell(6), cell(6)), fnn.Bidirectional(cell(6), cell(6)))
    x = _x(3, 7, 5)
    y, _ = model.apply(params, state, jnp.asarray(x.numpy()))
    _close(y, m(x)[0])
    back = to_torch(params, state, layout)
    fresh = torch_cls(5, 6, num_layers=2, bidirectional=True, batch_first=True)
    fresh.load_state_dict(as_torch(back), strict=True)
    _close(y, fresh(x)[0])


def test_lstm_with_projection_is_refused():
    m = nn.LSTM(4, 6, proj_size=2)
    with pytest.raises(WeightsError, match="proj_size"):
        from_torch(m.state_dict(), {"l": Rule("lstm", "")})


@pytest.mark.parametrize("kdim", [None, 3])
def test_multihead_attention_with_a_padding_mask(kdim):
    m = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    rule = {"a": Rule("multihead_attention", "", {"num_heads": 2})}
    params, _ = from_torch(m.state_dict(), rule)
    q = _x(2, 5, 8)
    kv = _x(2, 4, kdim or 8)
    lengths = torch.tensor([4, 2])
    pad = torch.arange(4)[None, :] >= lengths[:, None]  # torch: True is masked out
    expected, _ = m(q, kv, kv, key_padding_mask=pad)
    layer = fnn.MultiHeadAttention(2, cross=True)
    x = fnn.Seq(jnp.asarray(q.numpy()), memory=jnp.asarray(kv.numpy()),
                memory_lengths=jnp.asarray(lengths.numpy()))
    y, _ = layer.apply(params["a"], {}, x)
    _close(y.x, expected)
    _roundtrip(m, rule, params, {})


def test_causal_self_attention_mask_polarity():
    m = nn.MultiheadAttention(8, 4, batch_first=True)
    params, _ = from_torch(m.state_dict(), {"a": Rule("multihead_attention", "")}, num_heads=4)
    x = _x(2, 6, 8)
    future = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)  # torch: True is masked out
    expected, _ = m(x, x, x, attn_mask=future)
    y, _ = fnn.MultiHeadAttention(4, causal=True).apply(params["a"], {}, jnp.asarray(x.numpy()))
    _close(y, expected)
    # the same mask as a Seq's: True attends, the complement of torch's
    seq = fnn.Seq(jnp.asarray(x.numpy()), mask=jnp.asarray(~future.numpy()))
    y, _ = fnn.MultiHeadAttention(4).apply(params["a"], {}, seq)
    _close(y.x, expected)


def test_multihead_attention_export_refuses_grouped_query_heads():
    layer = fnn.MultiHeadAttention(4, num_kv_heads=2)
    params, _ = layer.init(jax.random.key(0), jnp.zeros((1, 3, 8)))
    with pytest.raises(WeightsError, match="key/value heads"):
        to_torch({"a": params}, {}, {"a": Rule("multihead_attention", "", {"num_heads": 4})})


@pytest.mark.parametrize("norm_first,activation", [(True, "gelu"), (False, "relu")])
def test_transformer_encoder_layer(norm_first, activation):
    m = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True,
                                   norm_first=norm_first, activation=activation)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("norm"):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    m.eval()
    rule = {"block": Rule("transformer_encoder_layer", "", {"num_heads": 4})}
    params, state = from_torch(m.state_dict(), rule)
    block = fnn.EncoderBlock(4, 32, activation=activation, norm_first=norm_first)
    x = _x(2, 5, 16)
    lengths = torch.tensor([5, 3])
    pad = torch.arange(5)[None, :] >= lengths[:, None]
    expected = m(x, src_key_padding_mask=pad)
    y, _ = block.apply(params["block"], {}, fnn.Seq(jnp.asarray(x.numpy()),
                                                    lengths=jnp.asarray(lengths.numpy())))
    valid = ~pad.numpy()  # torch's fast path leaves padded rows as they come: compare the rest
    np.testing.assert_allclose(np.asarray(y.x)[valid], expected.detach().numpy()[valid],
                               rtol=RTOL, atol=ATOL)
    plain = m(x)
    _close(block.apply(params["block"], {}, jnp.asarray(x.numpy()))[0], plain)
    _roundtrip(m, rule, params, state)


def test_bfloat16_state_dict():
    m = nn.Linear(4, 3).to(torch.bfloat16)
    params, _ = from_torch(m.state_dict(), {"fc": Rule("linear", "")})
    assert params["fc"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(params["fc"]["w"].astype(np.float32),
                                  m.weight.detach().float().numpy().T)
    back = as_torch(to_torch(params, {}, {"fc": Rule("linear", "")}))
    assert back["weight"].dtype == torch.bfloat16
    assert torch.equal(back["weight"], m.weight.detach())


# ----------------------------------------------------------------------------- layouts: errors


def test_an_entry_no_rule_reads_is_named():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(WeightsError, match=r"no rule of the layout reads .*2\.bias, 2\.weight"):
        from_torch(m.state_dict(), {"0": Rule("linear", "0.")})


def test_a_missing_entry_is_named_with_its_neighbours():
    m = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(WeightsError, match=r"'linear' for fnn path 'x' needs the state_dict "
                                           r"entry '1\.weight', which is missing"):
        from_torch(m.state_dict(), {"0": Rule("linear", "0."), "x": Rule("linear", "1.")})


def test_layout_mistakes_are_named():
    sd = nn.Linear(3, 4).state_dict()
    with pytest.raises(ValueError, match=r"layout\['a'\]: unknown family 'lineer'"):
        from_torch(sd, {"a": Rule("lineer", "")})
    with pytest.raises(ValueError, match=r"takes the options none, got \['num_heads'\]"):
        from_torch(sd, {"a": Rule("linear", "", {"num_heads": 2})})
    with pytest.raises(ValueError, match=r"count needs '\{i\}'"):
        from_torch(sd, {"a": Rule("linear", "", count=2)})
    with pytest.raises(TypeError, match=r"expected a Rule"):
        from_torch(sd, {"a": ("linear", "")})


def test_the_model_check_names_a_shape_mismatch():
    m = nn.Linear(3, 4)
    like = jax.eval_shape(fnn.Dense(5).init, jax.random.key(0), jnp.zeros((1, 3)))
    with pytest.raises(WeightsError, match=r"from_torch: params: entry 'fc/b': expected "
                                           r"float32\[5\], got float32\[4\]"):
        from_torch(m.state_dict(), {"fc": Rule("linear", "")}, like=({"fc": like[0]}, {}))


def test_to_torch_refuses_to_drop_a_weight():
    params = {"a": {"w": np.ones((2, 3))}, "b": {"w": np.ones((3, 1))}}
    with pytest.raises(WeightsError, match=r"no rule of the layout writes the params entries "
                                           r"b/w"):
        to_torch(params, {}, {"a": Rule("linear", "")})


def test_wrong_head_count_is_named():
    m = nn.MultiheadAttention(8, 2)
    with pytest.raises(WeightsError, match="num_heads must be a positive divisor of the "
                                           "embedding width 8, got 3"):
        from_torch(m.state_dict(), {"a": Rule("multihead_attention", "")}, num_heads=3)


def test_every_family_is_tested_here():
    tested_alone = {"linear", "conv", "conv_transpose", "batch_norm", "layer_norm", "group_norm",
                    "rms_norm", "embedding", "lstm", "gru", "rnn", "multihead_attention",
                    "transformer_encoder_layer"}
    tested_in_gpt2 = {"conv1d_hf", "gpt2_attention", "gpt2_block"}
    assert set(FAMILIES) == tested_alone | tested_in_gpt2


# ----------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def torch_resnet():
    import torch_resnet

    return torch_resnet


def _randomize_batch_norms(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("arch,expected_count", [("resnet18", 11_689_512),
                                                 ("resnet50", 25_557_032)])
def test_torchvision_resnet_eval_train_and_back(torch_resnet, arch, expected_count):
    m = getattr(torch_resnet, arch)()
    assert sum(p.numel() for p in m.parameters()) == expected_count  # torchvision's counts
    _randomize_batch_norms(m)
    model, params, state = import_torchvision_resnet(m.state_dict())
    assert fnn.param_count(params) == expected_count
    x = _x(2, 3, 64, 64)
    m.eval()
    y, _ = model.apply(params, state, _nhwc(x))
    _close_logits(y, m(x))
    m.train()
    y, new_state = model.apply(params, state, _nhwc(x), train=True)
    _close_logits(y, m(x))
    _close(new_state["stem"]["bn"]["mean"], m.bn1.running_mean)
    back = export_torchvision_resnet(params, state)
    assert sorted(back) == sorted(m.state_dict())
    fresh = getattr(torch_resnet, arch)()
    fresh.load_state_dict(as_torch(back), strict=True)
    for name, value in m.state_dict().items():
        if "running" not in name and "num_batches" not in name:  # m has trained since
            np.testing.assert_array_equal(numpy_array(fresh.state_dict()[name]),
                                          numpy_array(value), err_msg=name)


def test_real_torchvision_resnet18():
    try:
        import torchvision
    except Exception as e:  # PyPI's torchvision fails to import beside the CPU build of torch
        pytest.skip(f"torchvision does not import here: {e}")
    m = torchvision.models.resnet18(num_classes=7).eval()
    model, params, state = import_torchvision_resnet(m.state_dict())
    x = _x(2, 3, 64, 64)
    _close_logits(model.apply(params, state, _nhwc(x))[0], m(x))


def test_a_resnet_state_dict_of_another_model_is_refused():
    with pytest.raises(WeightsError, match="expected torchvision ResNet entries"):
        import_torchvision_resnet(nn.Linear(2, 2).state_dict())


def _hf_gpt2(tied: bool):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                       "(pip install -e '.[interop]')")
    config = transformers.GPT2Config(vocab_size=61, n_positions=24, n_embd=32, n_layer=3,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # LayerNorms and biases away from 1 and 0
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            elif "ln_" in name:
                p.uniform_(0.8, 1.2)
    return m


@pytest.mark.parametrize("tied", [True, False])
def test_hugging_face_gpt2_logits_and_back(tied):
    m = _hf_gpt2(tied)
    model, params = import_hf_gpt2(m.state_dict(), m.config)
    assert ("head" in params) is (not tied)
    ids = torch.randint(0, 61, (2, 24))
    logits, _ = model.apply(params, {}, jnp.asarray(ids.numpy(), jnp.int32))
    expected = m(ids).logits
    _close_logits(logits, expected)
    # fnn's own decode path from the imported weights continues as torch does
    prompt = jnp.asarray(ids[:, :5].numpy(), jnp.int32)
    state = fnn.models.init_gpt_cache(params, 2)
    greedy = fnn.models.generate(model, params, state, prompt, 6, key=jax.random.key(0),
                                 temperature=0.0)
    torch_greedy = m.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(greedy), torch_greedy.numpy())
    back = export_hf_gpt2(params)
    fresh = _hf_gpt2(tied)
    fresh.load_state_dict(as_torch(back), strict=True)
    _close_logits(logits, fresh(ids).logits)


def test_gpt2_needs_its_head_count_and_activation():
    m = _hf_gpt2(True)
    model, params = import_hf_gpt2(m.state_dict(), num_heads=4)  # as from the config
    ids = torch.randint(0, 61, (1, 7))
    _close_logits(model.apply(params, {}, jnp.asarray(ids.numpy(), jnp.int32))[0], m(ids).logits)
    with pytest.raises(TypeError, match=r"pass the model's config \(config=model.config\) or "
                                        r"num_heads"):
        import_hf_gpt2(m.state_dict())
    with pytest.raises(ValueError, match="features must be a multiple of num_heads, got "
                                         "features=32, num_heads=5"):
        import_hf_gpt2(m.state_dict(), num_heads=5)
    with pytest.raises(WeightsError, match="activation_function is 'relu'"):
        import_hf_gpt2(m.state_dict(), m.config.to_dict() | {"activation_function": "relu"})


def test_to_torch_refuses_leaves_torch_has_no_entry_for():
    adapted = fnn.lora(fnn.serial(fnn.Dense(4), fnn.Relu(), fnn.Dense(2)), rank=2)
    params, state = adapted.init(jax.random.key(0), jnp.zeros((1, 3)))
    layout = {"0": Rule("linear", "0."), "2": Rule("linear", "2.")}
    with pytest.raises(WeightsError, match=r"fnn path '0': torch has no entry for "
                                           r"params/lora_a, params/lora_b \(LoRA adapters: fold "
                                           r"them in with fnn.merge_lora first\)"):
        to_torch(params, state, layout)
    merged = to_torch(fnn.merge_lora(params, alpha=None), state, layout)
    assert sorted(merged) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    bn = {"scale": np.ones(3), "b": np.zeros(3)}
    extra_state = {"mean": np.zeros(3), "var": np.ones(3), "count": np.zeros(3)}
    with pytest.raises(WeightsError, match="torch has no entry for state/count"):
        to_torch({"bn": bn}, {"bn": extra_state}, {"bn": Rule("batch_norm", "")})


def test_a_stacked_rule_must_count_every_copy():
    model = fnn.repeat(fnn.Dense(4), 3)
    params, _ = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    with pytest.raises(WeightsError, match=r"count=2, but the params there are stacked \[3\]"):
        to_torch(params, {}, {"layers": Rule("linear", "h.{i}.", count=2)})
    with pytest.raises(ValueError, match="count must be a positive int, got 0"):
        to_torch(params, {}, {"layers": Rule("linear", "h.{i}.", count=0)})
    out = to_torch(params, {}, {"layers": Rule("linear", "h.{i}.", count=3)})
    assert sorted(out) == [f"h.{i}.{n}" for i in range(3) for n in ("bias", "weight")]


def test_gpt2_configs_of_other_attention_are_refused_and_bfloat16_weights_read_as_float32():
    m = _hf_gpt2(True)
    for option, value in (("scale_attn_by_inverse_layer_idx", True),
                          ("scale_attn_weights", False), ("add_cross_attention", True)):
        with pytest.raises(WeightsError, match=f"the config's {option} is {value}"):
            import_hf_gpt2(m.state_dict(), m.config.to_dict() | {option: value})
    half = {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}
    model, params = import_hf_gpt2(half, m.config)
    assert params["embed"]["table"].dtype == jnp.float32
    np.testing.assert_array_equal(params["embed"]["table"],
                                  half["transformer.wte.weight"].float().numpy())
    plain = fnn.models.GPT(61, features=32, num_heads=4, num_layers=1, hidden_features=64,
                           max_length=8, use_bias=False, activation="gelu_tanh",
                           tie_embeddings=True)
    no_bias, _ = plain.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(WeightsError, match="GPT-2 has biases in every projection"):
        export_hf_gpt2(no_bias)
