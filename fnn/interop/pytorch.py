"""PyTorch ``state_dict``\\ s to fnn params and state and back, by layout rules written once.

A *family* converts one torch module's entries (``weight``, ``bias``, ``running_mean``, ...) to
one fnn layer's params and state and back; a *layout* says which family reads which torch
prefix into which fnn path::

    layout = {"0": Rule("linear", "0."), "2": Rule("linear", "2.")}
    params, state = from_torch(torch_model.state_dict(), layout)    # fnn.serial(Dense, Relu, Dense)
    state_dict = to_torch(params, state, layout)                    # numpy arrays; as_torch(...)

The values may be torch tensors or numpy arrays (torch is imported only to read tensors, so a
state_dict saved as safetensors or npz needs no torch). Every entry of the state_dict must be
read by a rule (running-count buffers such as ``num_batches_tracked`` aside), and every leaf of
the fnn trees must be written by one: a weight is never dropped silently. Whole models are
:func:`import_torchvision_resnet` / :func:`export_torchvision_resnet` (torchvision's
``resnet18``, ``resnet50``, ...) and :func:`import_hf_gpt2` / :func:`export_hf_gpt2` (Hugging
Face's ``GPT2LMHeadModel``).

Families (:data:`FAMILIES`) and their layout rules, torch -> fnn:

- ``linear`` (``nn.Linear``): ``w = weight.T`` ``[in, out]``, ``b = bias``.
- ``conv1d_hf`` (Hugging Face's ``Conv1D``, GPT-2's projections): ``w = weight`` (already
  ``[in, out]``), ``b = bias``.
- ``conv`` (``nn.Conv1d/2d/3d``): ``weight [out, in / groups, *kernel] -> w [*kernel,
  in / groups, out]`` (channels-last); ``groups`` is fnn's ``feature_group_count``.
- ``conv_transpose`` (``nn.ConvTranspose1d/2d/3d``, option ``groups``, default 1):
  ``weight [in, out / groups, *kernel] -> w [*kernel, in / groups, out]`` (each group's block
  moved to its own output columns, Conv's layout); ``groups`` is fnn's
  ``feature_group_count``, and must be given (the weight's shape does not tell it). torch's
  ``padding=p, output_padding=q`` is fnn's ``padding=[(p, p - q)] * n`` (the output cropped by
  ``p`` below and ``p - q`` above).
- ``batch_norm`` (``nn.BatchNorm1d/2d/3d``): ``weight, bias -> scale, b``;
  ``running_mean, running_var -> state mean, var``.
- ``layer_norm``, ``group_norm``, ``rms_norm``: ``weight -> scale``, ``bias -> b``.
- ``embedding`` (``nn.Embedding``): ``weight -> table``.
- ``lstm``, ``gru``, ``rnn`` (one layer and direction of ``nn.LSTM/GRU/RNN``, chosen by the
  options ``layer`` and ``reverse``): ``w_i = weight_ih.T``, ``w_h = weight_hh.T``; LSTM and RNN
  ``b = bias_ih + bias_hh``; GRU ``b = bias_ih + [bias_hh_r, bias_hh_z, 0]``,
  ``b_hn = bias_hh_n`` (see :mod:`fnn.layers.recurrent`). Exported back, the summed bias goes to
  ``bias_ih`` and ``bias_hh`` holds what fnn keeps apart (zeros, or GRU's ``b_hn``).
- ``multihead_attention`` (``nn.MultiheadAttention``, option ``num_heads``): the packed
  ``in_proj_weight [3E, E]`` (or ``q/k/v_proj_weight``) split into ``query``/``key``/``value``
  ``w [in, num_heads, head_dim]``, ``out_proj`` into ``out w [num_heads, head_dim, E]``.
- ``transformer_encoder_layer`` (``nn.TransformerEncoderLayer``, option ``num_heads``):
  ``self_attn, linear1, linear2, norm1, norm2 -> attention, ffn/up, ffn/down, norm1, norm2`` of
  an :func:`~fnn.layers.EncoderBlock`.
- ``gpt2_attention``, ``gpt2_block`` (Hugging Face's GPT-2 ``attn`` and ``h.{i}``, option
  ``num_heads``): ``c_attn [E, 3E]`` split into query/key/value, ``c_proj`` the out projection;
  ``ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj -> norm1, attention, norm2, ffn/up, ffn/down`` of a
  :func:`~fnn.layers.DecoderBlock`.

Conventions that differ from PyTorch (what a porting user must set or know):

- **Layout**: fnn is channels-last. Images are ``[N, H, W, C]`` (torch ``[N, C, H, W]``:
  ``x.transpose(0, 2, 3, 1)``); recurrent layers and attention take ``[batch, time, features]``
  (torch's ``batch_first=True``; its default is ``[time, batch, features]``).
- **Conv padding**: fnn's default is ``"SAME"``, torch's ``0`` (``"VALID"``); pass torch's
  ``padding`` as an int (or pairs) to fnn's ``Conv``.
- **BatchNorm**: fnn's ``momentum`` is the weight of the old statistics: torch's ``momentum=0.1``
  is fnn's ``momentum=0.9`` (fnn's default is ``0.99``, Flax's; the ResNet importer sets 0.9).
  The running variance fnn keeps is updated with the *biased* batch
  variance (as Flax and Haiku), torch's with the unbiased one (``n / (n - 1)`` larger): imported
  statistics give the same outputs in evaluation, and in training the outputs are the same (both
  normalise with the biased batch variance) but the updated running variance differs by that
  factor on the batch's share. ``momentum=None`` (torch's cumulative average) has no equivalent.
- **Attention masks**: in fnn ``True`` means *attend* (a ``Seq``'s ``mask``), in torch's
  boolean ``attn_mask`` and ``key_padding_mask`` ``True`` means *masked out*: pass ``~mask``.
  A float torch mask is an additive bias: fnn's ``Seq(bias=...)``.
- **RMSNorm's epsilon**: fnn's default is ``1e-6``; torch's ``nn.RMSNorm(eps=None)`` uses the
  dtype's machine epsilon (``1.19e-7`` in float32): pass ``epsilon=`` explicitly.
- **LayerNorm/BatchNorm/GroupNorm epsilon**: ``1e-5`` in both.
- **GELU**: fnn's ``"gelu"`` is the exact erf form (torch's ``nn.GELU()``); GPT-2's
  ``gelu_new`` is ``"gelu_tanh"``.
- **Transformer blocks**: torch's ``TransformerEncoderLayer`` is post-norm unless
  ``norm_first=True``, its activation ``relu``: build fnn's block with ``norm_first=`` and
  ``activation=`` to match.
- **What a state_dict does not hold** must be matched by hand when building the fnn model:
  ``nn.RNN(nonlinearity="relu")`` (``SimpleRNNCell(activation=...)``), a conv's
  ``padding_mode`` other than zeros (``Pad(p, mode=...)`` before a ``padding="VALID"`` conv,
  the same mode names), a transposed conv's ``groups`` (the option above),
  ``MultiheadAttention(add_zero_attn=True)`` (no fnn equivalent), and every size that the
  weights do not show (strides, paddings, head counts).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn.core import Layer
from fnn.interop.weights import WeightsError, fit_to, flatten

Arrays = dict[str, np.ndarray]

# entries a torch module keeps that carry no weight fnn has: BatchNorm's step count (used only by
# momentum=None) and the causal-mask buffers of older Hugging Face GPT-2 checkpoints
IGNORED = (r"(^|\.)num_batches_tracked$", r"(^|\.)attn\.(masked_)?bias$")


def numpy_array(value: Any) -> np.ndarray:
    """A torch tensor (any device and dtype, ``bfloat16`` included) or array as numpy. A
    tensor's data is copied: torch updates some in place (BatchNorm's running statistics), and
    imported weights must not change with it."""
    if hasattr(value, "detach"):  # a torch tensor: torch is importable, since it made one
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            import ml_dtypes

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return value.numpy().copy()
    return np.asarray(value)


def as_torch(state_dict: Mapping[str, Any]) -> dict:
    """The arrays of ``state_dict`` as torch tensors, for ``module.load_state_dict``."""
    import torch

    def tensor(a):
        a = np.array(a, order="C")  # a writable copy (ascontiguousarray makes scalars 1-d)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    return {name: tensor(numpy_array(v)) for name, v in state_dict.items()}


# ----------------------------------------------------------------------------- families


class _Entries:
    """The entries under one prefix of a state_dict; remembers which were read."""

    def __init__(self, arrays: Arrays, prefix: str, used: set[str], rule: str):
        self.arrays, self.prefix, self.used, self.rule = arrays, prefix, used, rule

    def has(self, name: str) -> bool:
        return self.prefix + name in self.arrays

    def __call__(self, name: str) -> np.ndarray:
        full = self.prefix + name
        if full not in self.arrays:
            near = sorted(k for k in self.arrays if k.startswith(self.prefix))
            raise WeightsError(f"{self.rule} needs the state_dict entry {full!r}, which is "
                               f"missing (entries under {self.prefix!r}: "
                               f"{', '.join(near[:12]) or 'none'})")
        self.used.add(full)
        return self.arrays[full]

    def optional(self, name: str) -> np.ndarray | None:
        return self(name) if self.has(name) else None

    def under(self, prefix: str) -> "_Entries":
        return _Entries(self.arrays, self.prefix + prefix, self.used, self.rule)


class Family(NamedTuple):
    """The layout rules of one torch module kind: ``to_fnn(entries, **options) -> (params,
    state)`` reads the module's entries, ``to_torch(params, state, **options) -> {name: array}``
    writes them (names relative to the module's prefix). ``options`` are the names it takes."""

    to_fnn: Callable[..., tuple[dict, dict]]
    to_torch: Callable[..., Arrays]
    options: frozenset[str] = frozenset()


def _with_bias(out: dict, bias: np.ndarray | None, name: str = "b") -> dict:
    return out | ({} if bias is None else {name: bias})


def _affine_to_torch(params: dict) -> Arrays:
    return _with_bias({"weight": params["scale"]} if "scale" in params else {},
                      params.get("b"), "bias")


def _linear_to_fnn(e):
    return _with_bias({"w": e("weight").T}, e.optional("bias")), {}


def _linear_to_torch(params, state):
    return _with_bias({"weight": params["w"].T}, params.get("b"), "bias")


def _conv1d_hf_to_fnn(e):
    return {"w": e("weight"), "b": e("bias")}, {}


def _conv1d_hf_to_torch(params, state):
    return {"weight": params["w"], "bias": params["b"]}


def _kernel_axes(ndim: int) -> tuple[int, ...]:
    """The permutation from torch's ``[out, in, *kernel]`` to fnn's ``[*kernel, in, out]``."""
    return tuple(range(2, ndim)) + (1, 0)


def _conv_weight(e) -> np.ndarray:
    w = e("weight")
    if w.ndim not in (3, 4, 5):
        raise WeightsError(f"{e.rule}: expected a weight [out, in, *kernel] of 1-3 spatial "
                           f"dimensions, got shape {w.shape}")
    return w


def _conv_to_fnn(e):
    w = _conv_weight(e)
    return _with_bias({"w": w.transpose(_kernel_axes(w.ndim))}, e.optional("bias")), {}


def _conv_to_torch(params, state):
    w = params["w"]
    return _with_bias({"weight": w.transpose(np.argsort(_kernel_axes(w.ndim)))}, params.get("b"),
                      "bias")


def _check_groups(where: str, groups: Any, channels: int, what: str) -> None:
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or channels % groups:
        raise WeightsError(f"{where}: groups must be a positive divisor of the {what} "
                           f"{channels}, got {groups!r}")


def _conv_transpose_to_fnn(e, groups=1):
    """torch ``[in, out / groups, *kernel]`` -> fnn ``[*kernel, in / groups, out]``: group
    ``g``'s block ``[in / groups, out / groups]`` moves to the columns ``g * out / groups ...``
    of fnn's kernel (:func:`~fnn.layers.ConvTranspose`'s layout, Conv's)."""
    w = _conv_weight(e)
    _check_groups(e.rule, groups, w.shape[0], "weight's input channels")
    n = w.ndim - 2
    # [groups, in / groups, out / groups, *kernel] -> [*kernel, in / groups, groups, out / groups]
    w = w.reshape((groups, w.shape[0] // groups) + w.shape[1:])
    w = w.transpose(tuple(range(3, 3 + n)) + (1, 0, 2))
    return _with_bias({"w": w.reshape(w.shape[:n + 1] + (-1,))}, e.optional("bias")), {}


def _conv_transpose_to_torch(params, state, groups=1):
    w = params["w"]
    n = w.ndim - 2
    _check_groups("to_torch: conv_transpose", groups, w.shape[-1], "kernel's output channels")
    # [*kernel, in / groups, groups, out / groups] -> [groups, in / groups, out / groups, *kernel]
    w = w.reshape(w.shape[:n + 1] + (groups, w.shape[-1] // groups))
    w = w.transpose((n + 1, n, n + 2) + tuple(range(n)))
    return _with_bias({"weight": w.reshape((-1,) + w.shape[2:])}, params.get("b"), "bias")


def _batch_norm_to_fnn(e):
    if not e.has("running_mean"):
        raise WeightsError(f"{e.rule}: no running statistics under {e.prefix!r} "
                           f"(track_running_stats=False has no fnn equivalent)")
    e.optional("num_batches_tracked")
    params = _with_bias({"scale": e("weight")} if e.has("weight") else {}, e.optional("bias"))
    return params, {"mean": e("running_mean"), "var": e("running_var")}


def _batch_norm_to_torch(params, state):
    # the step count matters only to torch's momentum=None, which fnn has no equivalent of
    return _affine_to_torch(params) | {"running_mean": state["mean"],
                                       "running_var": state["var"],
                                       "num_batches_tracked": np.array(0, np.int64)}


def _norm_to_fnn(e):
    return _with_bias({"scale": e("weight")} if e.has("weight") else {}, e.optional("bias")), {}


def _embedding_to_fnn(e):
    return {"table": e("weight")}, {}


def _embedding_to_torch(params, state):
    return {"weight": params["table"]}


def _suffix(layer: int, reverse: bool) -> str:
    return f"_l{layer}" + ("_reverse" if reverse else "")


def _recurrent_to_fnn(e, kind, layer=0, reverse=False):
    s = _suffix(layer, reverse)
    if e.has(f"weight_hr{s}"):
        raise WeightsError(f"{e.rule}: the LSTM has a projection (weight_hr{s}, proj_size > 0), "
                           f"which fnn's LSTM does not have")
    w_ih, w_hh = e(f"weight_ih{s}"), e(f"weight_hh{s}")
    b_ih, b_hh = e.optional(f"bias_ih{s}"), e.optional(f"bias_hh{s}")
    zeros = np.zeros(w_ih.shape[0], w_ih.dtype)
    b_ih = zeros if b_ih is None else b_ih
    b_hh = zeros if b_hh is None else b_hh
    params = {"w_i": w_ih.T, "w_h": w_hh.T}
    if kind == "gru":
        h = w_hh.shape[1]
        return params | {"b": b_ih + np.concatenate([b_hh[:2 * h], zeros[:h]]),
                         "b_hn": b_hh[2 * h:]}, {}
    return params | {"b": b_ih + b_hh}, {}


def _recurrent_to_torch(params, state, kind, layer=0, reverse=False):
    s = _suffix(layer, reverse)
    b = params["b"]
    if kind == "gru":
        h = params["w_h"].shape[0]
        b_hh = np.concatenate([np.zeros(2 * h, b.dtype), params["b_hn"]])
    else:
        b_hh = np.zeros_like(b)
    return {f"weight_ih{s}": params["w_i"].T, f"weight_hh{s}": params["w_h"].T,
            f"bias_ih{s}": b, f"bias_hh{s}": b_hh}


def _heads(name: str, num_heads: int, width: int) -> int:
    if not isinstance(num_heads, int) or num_heads <= 0 or width % num_heads:
        raise WeightsError(f"{name}: num_heads must be a positive divisor of the embedding "
                           f"width {width}, got {num_heads!r}")
    return width // num_heads


def _projections(ws: list[np.ndarray], bs: list[np.ndarray | None], w_out: np.ndarray,
                 b_out: np.ndarray | None, num_heads: int, rule: str) -> dict:
    """fnn attention params from ``[in, out]`` query/key/value/out matrices."""
    d = _heads(rule, num_heads, ws[0].shape[1])
    params = {}
    for name, w, b in zip(("query", "key", "value"), ws, bs):
        params[name] = _with_bias({"w": w.reshape(w.shape[0], num_heads, d)},
                                  None if b is None else b.reshape(num_heads, d))
    params["out"] = _with_bias({"w": w_out.reshape(num_heads, d, w_out.shape[1])}, b_out)
    return params


def _flat_projections(params: dict) -> tuple[list, list, np.ndarray, np.ndarray | None]:
    """The inverse of :func:`_projections`: ``[in, out]`` matrices and flat biases."""
    ws, bs = [], []
    for name in ("query", "key", "value"):
        w = params[name]["w"]
        ws.append(w.reshape(w.shape[0], -1))
        bs.append(params[name]["b"].reshape(-1) if "b" in params[name] else None)
    w_out = params["out"]["w"]
    return ws, bs, w_out.reshape(-1, w_out.shape[-1]), params["out"].get("b")


def _mha_to_fnn(e, num_heads):
    for extra in ("bias_k", "bias_v"):
        if e.has(extra):
            raise WeightsError(f"{e.rule}: {e.prefix}{extra} (add_bias_kv=True) has no fnn "
                               f"equivalent")
    if e.has("in_proj_weight"):
        ws = [w.T for w in np.split(e("in_proj_weight"), 3)]
    else:
        ws = [e(f"{n}_proj_weight").T for n in "qkv"]
    bias = e.optional("in_proj_bias")
    bs = [None] * 3 if bias is None else np.split(bias, 3)
    return _projections(ws, bs, e("out_proj.weight").T, e.optional("out_proj.bias"),
                        num_heads, e.rule), {}


def _mha_to_torch(params, state, num_heads):
    ws, bs, w_out, b_out = _flat_projections(params)
    shapes = [params[n]["w"].shape for n in ("query", "key", "value", "out")]
    embed = shapes[0][0]
    # torch's MultiheadAttention: as many key/value heads as query heads, of width E / heads,
    # and an output as wide as the input
    if any(s[1] != num_heads or s[1] * s[2] != embed for s in shapes[:3]) or shapes[3][-1] != embed:
        raise WeightsError(f"multihead_attention: torch's MultiheadAttention needs {num_heads} "
                           f"query and key/value heads of width {embed} / {num_heads} and an "
                           f"output of {embed}; got query/key/value/out w of shapes {shapes}")
    same = len({w.shape[0] for w in ws}) == 1
    out = ({"in_proj_weight": np.concatenate([w.T for w in ws])} if same
           else {f"{n}_proj_weight": w.T for n, w in zip("qkv", ws)})
    if bs[0] is not None:
        out["in_proj_bias"] = np.concatenate(bs)
    return out | _with_bias({"out_proj.weight": w_out.T}, b_out, "out_proj.bias")


def _gpt2_attention_to_fnn(e, num_heads):
    w, b = e("c_attn.weight"), e("c_attn.bias")
    return _projections(np.split(w, 3, axis=1), np.split(b, 3), e("c_proj.weight"),
                        e("c_proj.bias"), num_heads, e.rule), {}


def _gpt2_attention_to_torch(params, state, num_heads):
    ws, bs, w_out, b_out = _flat_projections(params)
    return {"c_attn.weight": np.concatenate(ws, axis=1), "c_attn.bias": np.concatenate(bs),
            "c_proj.weight": w_out, "c_proj.bias": b_out}


class Rule(NamedTuple):
    """Reads the torch module at ``prefix`` (``"layer1.0.conv1."``) with ``family``.
    ``options`` go to the family (``{"num_heads": 12}``). With ``count``, ``prefix`` holds
    ``{i}`` and the modules ``i = 0 .. count - 1`` are read and stacked along a new leading axis
    (fnn's :func:`~fnn.combinators.repeat` keeps its blocks' params so)."""

    family: str
    prefix: str
    options: Mapping[str, Any] = {}
    count: int | None = None


def _composite(layout: Mapping[str, Rule]) -> Family:
    """A family made of other families, each at a path below the composite's and a prefix below
    its prefix; the composite's options go to every part that takes them."""
    options = frozenset().union(*(FAMILIES[r.family].options for r in layout.values()))

    def to_fnn(e, **opts):
        return _read_layout(e.arrays, layout, e.used, e.prefix, opts)

    def to_torch(params, state, **opts):
        return _write_layout(params, state, layout, opts)

    return Family(to_fnn, to_torch, options)


def _family(to_fnn, to_torch, options=(), **bound) -> Family:
    return Family(lambda e, **o: to_fnn(e, **bound, **o),
                  lambda p, s, **o: to_torch(p, s, **bound, **o), frozenset(options))


FAMILIES: dict[str, Family] = {
    "linear": _family(_linear_to_fnn, _linear_to_torch),
    "conv1d_hf": _family(_conv1d_hf_to_fnn, _conv1d_hf_to_torch),
    "conv": _family(_conv_to_fnn, _conv_to_torch),
    "conv_transpose": _family(_conv_transpose_to_fnn, _conv_transpose_to_torch, ("groups",)),
    "batch_norm": _family(_batch_norm_to_fnn, _batch_norm_to_torch),
    "layer_norm": _family(_norm_to_fnn, lambda p, s: _affine_to_torch(p)),
    "group_norm": _family(_norm_to_fnn, lambda p, s: _affine_to_torch(p)),
    "rms_norm": _family(_norm_to_fnn, lambda p, s: _affine_to_torch(p)),
    "embedding": _family(_embedding_to_fnn, _embedding_to_torch),
    "lstm": _family(_recurrent_to_fnn, _recurrent_to_torch, ("layer", "reverse"), kind="lstm"),
    "gru": _family(_recurrent_to_fnn, _recurrent_to_torch, ("layer", "reverse"), kind="gru"),
    "rnn": _family(_recurrent_to_fnn, _recurrent_to_torch, ("layer", "reverse"), kind="rnn"),
    "multihead_attention": _family(_mha_to_fnn, _mha_to_torch, ("num_heads",)),
    "gpt2_attention": _family(_gpt2_attention_to_fnn, _gpt2_attention_to_torch,
                              ("num_heads",)),
}
FAMILIES["transformer_encoder_layer"] = _composite({
    "norm1": Rule("layer_norm", "norm1."), "attention": Rule("multihead_attention", "self_attn."),
    "norm2": Rule("layer_norm", "norm2."), "ffn/up": Rule("linear", "linear1."),
    "ffn/down": Rule("linear", "linear2.")})
FAMILIES["gpt2_block"] = _composite({
    "norm1": Rule("layer_norm", "ln_1."), "attention": Rule("gpt2_attention", "attn."),
    "norm2": Rule("layer_norm", "ln_2."), "ffn/up": Rule("conv1d_hf", "mlp.c_fc."),
    "ffn/down": Rule("conv1d_hf", "mlp.c_proj.")})


# ----------------------------------------------------------------------------- layouts


def _check_rule(path: str, rule: Any) -> Family:
    if not isinstance(rule, Rule):
        raise TypeError(f"layout[{path!r}]: expected a Rule(family, prefix, ...), got {rule!r}")
    if rule.family not in FAMILIES:
        raise ValueError(f"layout[{path!r}]: unknown family {rule.family!r}; known: "
                         f"{', '.join(sorted(FAMILIES))}")
    family = FAMILIES[rule.family]
    unknown = set(rule.options) - family.options
    if unknown:
        raise ValueError(f"layout[{path!r}]: family {rule.family!r} takes the options "
                         f"{sorted(family.options) or 'none'}, got {sorted(unknown)}")
    if rule.count is not None and (not isinstance(rule.count, int) or rule.count < 1):
        raise ValueError(f"layout[{path!r}]: count must be a positive int, got {rule.count!r}")
    if (rule.count is None) != ("{i}" not in rule.prefix):
        raise ValueError(f"layout[{path!r}]: a Rule with count needs '{{i}}' in its prefix and "
                         f"one without does not take it, got prefix={rule.prefix!r}, "
                         f"count={rule.count!r}")
    return family


def _options(family: Family, rule: Rule, given: Mapping[str, Any]) -> dict:
    return {k: v for k, v in given.items() if k in family.options} | dict(rule.options)


def _put(tree: dict, path: str, value: dict) -> None:
    if not value:
        return
    *parents, last = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _get(tree: dict, path: str) -> dict:
    for part in path.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return {}
        tree = tree[part]
    return tree


def _read_layout(arrays: Arrays, layout: Mapping[str, Rule], used: set[str], base: str,
                 given: Mapping[str, Any]) -> tuple[dict, dict]:
    params: dict = {}
    state: dict = {}
    for path, rule in layout.items():
        family = _check_rule(path, rule)
        opts = _options(family, rule, given)
        where = f"rule {rule.family!r} for fnn path {path!r}"
        prefixes = ([base + rule.prefix] if rule.count is None
                    else [base + rule.prefix.format(i=i) for i in range(rule.count)])
        parts = [family.to_fnn(_Entries(arrays, p, used, where), **opts) for p in prefixes]
        if rule.count is None:
            p, s = parts[0]
        else:
            p, s = (jax.tree.map(lambda *xs: np.stack(xs), *[part[k] for part in parts])
                    for k in (0, 1))
        _put(params, path, p)
        _put(state, path, s)
    return params, state


def _write_layout(params: dict, state: dict, layout: Mapping[str, Rule],
                  given: Mapping[str, Any]) -> Arrays:
    out: Arrays = {}
    for path, rule in layout.items():
        family = _check_rule(path, rule)
        opts = _options(family, rule, given)
        p, s = _get(params, path), _get(state, path)
        if not p and not s:
            raise WeightsError(f"to_torch: rule {rule.family!r} for fnn path {path!r}: the "
                               f"params have nothing there")
        where = f"to_torch: rule {rule.family!r} for fnn path {path!r}"
        if rule.count is None:
            pieces = [(rule.prefix, p, s)]
        else:
            stacked = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves((p, s))}
            if stacked != {rule.count}:
                raise WeightsError(f"{where}: count={rule.count}, but the params there are "
                                   f"stacked {sorted(stacked, key=str)} deep")
            pieces = [(rule.prefix.format(i=i), jax.tree.map(lambda a: a[i], p),
                       jax.tree.map(lambda a: a[i], s)) for i in range(rule.count)]
        for prefix, p_i, s_i in pieces:
            try:
                written = family.to_torch(p_i, s_i, **opts)
            except KeyError as e:
                raise WeightsError(f"{where} needs the entry {e.args[0]!r}, which is missing "
                                   f"(got {sorted(p_i)})") from None
            _check_written(where, family, opts, written, p_i, s_i)
            out |= {prefix + name: value for name, value in written.items()}
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if np.shape(a) != np.shape(b) or np.asarray(a).dtype != np.asarray(b).dtype:
        return False
    if np.issubdtype(np.asarray(a).dtype, np.inexact) or np.asarray(a).dtype.kind == "V":
        return np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64),
                              equal_nan=True)
    return np.array_equal(a, b)


def _check_written(where: str, family: Family, opts: dict, written: Arrays, params: dict,
                   state: dict) -> None:
    """What a family wrote must read back as the params and state it was given, leaf for leaf:
    a leaf the family does not know (unmerged LoRA adapters, a state it has no torch entry
    for) would otherwise be left out of the state_dict without a word."""
    back = family.to_fnn(_Entries(written, "", set(), where), **opts)
    given, got = flatten({"params": params, "state": state}), flatten(
        {"params": back[0], "state": back[1]})
    left_out = sorted(set(given) - set(got))
    if left_out:
        hint = (" (LoRA adapters: fold them in with fnn.merge_lora first)"
                if any(n.rsplit("/", 1)[-1].startswith("lora_") for n in left_out) else "")
        raise WeightsError(f"{where}: torch has no entry for {', '.join(left_out)}{hint}")
    changed = [n for n in given if not _same(given[n], got[n])]
    if changed:
        raise WeightsError(f"{where}: the entries {', '.join(changed)} do not read back as they "
                           f"were written (shapes {[np.shape(given[n]) for n in changed]})")


def _ignored(name: str, ignore: tuple[str, ...]) -> bool:
    return any(re.search(pattern, name) for pattern in ignore)


def from_torch(state_dict: Mapping[str, Any], layout: Mapping[str, Rule], *,
               like: Any = None, ignore: tuple[str, ...] = IGNORED, **options
               ) -> tuple[dict, dict]:
    """fnn ``(params, state)`` from a PyTorch ``state_dict`` (tensors or arrays) by ``layout``,
    ``{fnn path: Rule(family, torch prefix, ...)}``. ``options`` (``num_heads=...``) go to every
    rule whose family takes them. Every entry must be read by a rule, unless it matches one of
    the ``ignore`` regular expressions (default :data:`IGNORED`: buffers that hold no weight).
    With ``like`` (the model's ``(params, state)``, e.g. ``jax.eval_shape(model.init, ...)``),
    the result is checked against it (names, shapes, dtypes) and returned as ``jax.Array``\\ s
    of its structure; without it as numpy arrays in nested dicts.

    >>> import numpy as np
    >>> state_dict = {"0.weight": np.ones((3, 2)), "0.bias": np.zeros(3)}
    >>> params, state = from_torch(state_dict, {"hidden": Rule("linear", "0.")})
    >>> params["hidden"]["w"].shape, state
    ((2, 3), {})
    """
    arrays = {name: numpy_array(value) for name, value in state_dict.items()}
    used: set[str] = set()
    params, state = _read_layout(arrays, layout, used, "", options)
    unread = sorted(k for k in arrays if k not in used and not _ignored(k, ignore))
    if unread:
        raise WeightsError(f"from_torch: no rule of the layout reads the state_dict entries "
                           f"{', '.join(unread[:12])}" + (f" and {len(unread) - 12} more"
                                                          if len(unread) > 12 else ""))
    if like is None:
        return params, state
    return (fit_to(flatten(params), like[0], source="from_torch: params"),
            fit_to(flatten(state), like[1], source="from_torch: state"))


def to_torch(params: Any, state: Any, layout: Mapping[str, Rule], **options) -> Arrays:
    """The PyTorch ``state_dict`` (``{name: numpy array}``; :func:`as_torch` makes tensors) of
    fnn ``params`` and ``state`` by ``layout``, the inverse of :func:`from_torch`. Every leaf of
    ``params`` and ``state`` must be written by a rule."""
    host = jax.tree.map(np.asarray, (params, state))
    out = _write_layout(*host, layout, options)
    covered = [path for path in layout]
    for what, tree in zip(("params", "state"), host):
        left = [name for name in flatten(tree)
                if not any(name == c or name.startswith(c + "/") for c in covered)]
        if left:
            raise WeightsError(f"to_torch: no rule of the layout writes the {what} entries "
                               f"{', '.join(left[:12])}")
    return out


# ----------------------------------------------------------------------------- ResNet


def resnet_layout(stage_sizes: tuple[int, ...], block: str = "basic") -> dict[str, Rule]:
    """The layout between torchvision's ``ResNet`` and :func:`fnn.models.ResNet`
    (``stem="imagenet"``; the same ``stage_sizes`` and ``block``)."""
    convs = 2 if block == "basic" else 3
    layout = {"stem/conv": Rule("conv", "conv1."), "stem/bn": Rule("batch_norm", "bn1.")}
    for s, blocks in enumerate(stage_sizes, start=1):
        for b in range(blocks):
            fnn_block, torch_block = f"stage{s}/block{b + 1}", f"layer{s}.{b}."
            for i in range(1, convs + 1):
                layout[f"{fnn_block}/conv{i}"] = Rule("conv", f"{torch_block}conv{i}.")
                layout[f"{fnn_block}/bn{i}"] = Rule("batch_norm", f"{torch_block}bn{i}.")
            layout[f"{fnn_block}/shortcut/conv"] = Rule("conv", f"{torch_block}downsample.0.")
            layout[f"{fnn_block}/shortcut/bn"] = Rule("batch_norm", f"{torch_block}downsample.1.")
    return layout | {"head": Rule("linear", "fc.")}


def _float32(state_dict: Mapping[str, Any]) -> Arrays:
    """The state_dict as numpy, floating entries in float32 (exact from bfloat16 and float16),
    the dtype of the params of the fnn models the importers build."""
    arrays = {name: numpy_array(v) for name, v in state_dict.items()}
    return {name: a.astype(np.float32) if np.issubdtype(a.dtype, np.floating)
            or a.dtype.name == "bfloat16" else a for name, a in arrays.items()}


def _resnet_shape(names: list[str], source: str) -> tuple[tuple[int, ...], str]:
    """``stage_sizes`` and ``block`` from the entry names of a torchvision ResNet."""
    blocks: dict[int, set[int]] = {}
    for name in names:
        m = re.match(r"layer(\d+)\.(\d+)\.", name)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = sorted(blocks)
    if not stages or stages != list(range(1, len(stages) + 1)) or any(
            blocks[s] != set(range(len(blocks[s]))) for s in stages):
        raise WeightsError(f"{source}: expected torchvision ResNet entries layer1.0. ... "
                           f"layerN.M., got stages {stages or 'none'}")
    block = "bottleneck" if any(re.match(r"layer\d+\.\d+\.conv3\.", n) for n in names) else "basic"
    return tuple(len(blocks[s]) for s in stages), block


def _drop_optional_shortcuts(layout: dict[str, Rule], names: set[str]) -> dict[str, Rule]:
    """The layout without the shortcut rules of blocks that have none (identity shortcuts)."""
    return {path: rule for path, rule in layout.items()
            if "shortcut" not in path or rule.prefix + "weight" in names}


def import_torchvision_resnet(state_dict: Mapping[str, Any]) -> tuple[Layer, dict, dict]:
    """An :func:`fnn.models.ResNet` with the weights of a torchvision ResNet's ``state_dict``
    (``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``, any
    ``num_classes``; floating entries are read as float32): returns ``(model, params,
    state)``. The model takes channels-last images
    ``[N, H, W, 3]`` (torch's ``x.permute(0, 2, 3, 1)``) and gives the same logits as torch in
    evaluation and in training (batch statistics; see the BatchNorm note in this module's
    docs). Its BatchNorm momentum is torchvision's (0.1, fnn's ``momentum=0.9``)."""
    from fnn.models import ResNet

    arrays = _float32(state_dict)
    stage_sizes, block = _resnet_shape(list(arrays), "import_torchvision_resnet")
    if "fc.weight" not in arrays:
        raise WeightsError("import_torchvision_resnet: no fc.weight: expected the state_dict of "
                           "a whole torchvision ResNet, with its classifier fc")
    stem = arrays.get("conv1.weight")
    if stem is None or stem.shape[2:] != (7, 7):
        raise WeightsError(f"import_torchvision_resnet: expected the 7x7 stem conv1.weight "
                           f"[features, 3, 7, 7], got {None if stem is None else stem.shape}")
    model = ResNet(stage_sizes, block=block, num_classes=arrays["fc.weight"].shape[0],
                   features=stem.shape[0], momentum=0.9)
    layout = _drop_optional_shortcuts(resnet_layout(stage_sizes, block), set(arrays))
    like = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, stem.shape[1]), jnp.float32))
    params, state = from_torch(arrays, layout, like=like)
    return model, params, state


def export_torchvision_resnet(params: dict, state: dict) -> Arrays:
    """The torchvision ``state_dict`` of an :func:`fnn.models.ResNet` (``stem="imagenet"``),
    the inverse of :func:`import_torchvision_resnet`."""
    stages = sorted((k for k in params if re.fullmatch(r"stage\d+", k)), key=lambda k: int(k[5:]))
    if not stages:
        raise WeightsError(f"export_torchvision_resnet: expected the params of an "
                           f"fnn.models.ResNet (stem, stage1, ..., head), got {sorted(params)}")
    block = "bottleneck" if "conv3" in params[stages[0]]["block1"] else "basic"
    layout = {path: rule for path, rule in
              resnet_layout(tuple(len(params[s]) for s in stages), block).items()
              if "shortcut" not in path or _get(params, path)}
    return to_torch(params, state, layout)


# ----------------------------------------------------------------------------- GPT-2


def gpt2_layout(num_layers: int, *, prefix: str = "transformer.", tied: bool = True
                ) -> dict[str, Rule]:
    """The layout between Hugging Face's ``GPT2LMHeadModel`` (``prefix="transformer."``; ``""``
    for a ``GPT2Model``) and :func:`fnn.models.GPT`; ``tied=False`` reads ``lm_head`` into the
    model's own ``head``."""
    return {"embed": Rule("embedding", f"{prefix}wte."),
            "position": Rule("embedding", f"{prefix}wpe."),
            "blocks/layers": Rule("gpt2_block", prefix + "h.{i}.", count=num_layers),
            "norm": Rule("layer_norm", f"{prefix}ln_f.")} | (
        {} if tied else {"head": Rule("linear", "lm_head.")})


def _gpt2_config(config: Any, num_heads: int | None, norm_epsilon: float | None
                 ) -> tuple[int, float]:
    """``(num_heads, norm_epsilon)`` from a ``GPT2Config`` (or its ``to_dict()``) or the
    arguments; the weights do not say how many heads they hold."""
    if config is not None:
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        activation = get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise WeightsError(f"import_hf_gpt2: the config's activation_function is "
                               f"{activation!r}; fnn's GPT-2 import has the tanh GELU "
                               f"('gelu_new')")
        for option, fnn_has in (("scale_attn_weights", True), ("add_cross_attention", False),
                                ("scale_attn_by_inverse_layer_idx", False)):
            if get(option, fnn_has) != fnn_has:  # attention other than fnn's GPT computes
                raise WeightsError(f"import_hf_gpt2: the config's {option} is "
                                   f"{get(option)!r}; fnn's GPT has {fnn_has}")
        num_heads = get("n_head") if num_heads is None else num_heads
        norm_epsilon = get("layer_norm_epsilon", 1e-5) if norm_epsilon is None else norm_epsilon
    if num_heads is None:
        raise TypeError("import_hf_gpt2: pass the model's config (config=model.config) or "
                        "num_heads (its n_head): the weights do not say how many heads they "
                        "hold")
    return num_heads, 1e-5 if norm_epsilon is None else norm_epsilon


def import_hf_gpt2(state_dict: Mapping[str, Any], config: Any = None, *,
                   num_heads: int | None = None, norm_epsilon: float | None = None
                   ) -> tuple[Layer, dict]:
    """A :func:`fnn.models.GPT` with the weights of a Hugging Face ``GPT2LMHeadModel`` (or
    ``GPT2Model``) ``state_dict``: returns ``(model, params)``; its state is ``{}``.
    ``config`` is the model's ``GPT2Config`` (or its dict), from which ``n_head`` and
    ``layer_norm_epsilon`` are read; or give ``num_heads`` (and ``norm_epsilon``, default
    ``1e-5``) directly. A wrong head count that divides the width cannot be told from the
    weights: it gives a model of other logits, so prefer the config. The sizes come from the
    weights; the activation is GPT-2's ``gelu_new`` (``"gelu_tanh"``), the head tied to the
    token embedding unless ``lm_head`` differs from it (then the head is the model's own,
    without a bias in torch: zeros here).
    ``ids: int[..., time] -> logits [..., time, vocab_size]``, equal to torch's ``logits``."""
    from fnn.models import GPT

    num_heads, norm_epsilon = _gpt2_config(config, num_heads, norm_epsilon)
    arrays = _float32(state_dict)
    prefix = "transformer." if "transformer.wte.weight" in arrays else ""
    if f"{prefix}wte.weight" not in arrays:
        raise WeightsError("import_hf_gpt2: expected a GPT-2 state_dict with "
                           "transformer.wte.weight (or wte.weight)")
    layers = {int(m[1]) for n in arrays if (m := re.match(re.escape(prefix) + r"h\.(\d+)\.", n))}
    table = arrays[f"{prefix}wte.weight"]
    head = arrays.get("lm_head.weight")
    tied = head is None or (head.shape == table.shape and np.array_equal(head, table))
    if tied and head is not None:
        arrays.pop("lm_head.weight")
    vocab, features = table.shape
    model = GPT(vocab, features=features, num_heads=num_heads, num_layers=len(layers),
                hidden_features=arrays[f"{prefix}h.0.mlp.c_fc.weight"].shape[1],
                max_length=arrays[f"{prefix}wpe.weight"].shape[0], tie_embeddings=tied,
                activation="gelu_tanh", norm_epsilon=norm_epsilon)
    if not tied:  # torch's lm_head has no bias; fnn's head has one: zero
        arrays["lm_head.bias"] = np.zeros(vocab, head.dtype)
    like = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 1), jnp.int32))
    params, _ = from_torch(arrays, gpt2_layout(len(layers), prefix=prefix, tied=tied),
                           like=like, num_heads=num_heads)
    return model, params


def export_hf_gpt2(params: dict) -> Arrays:
    """The Hugging Face ``GPT2LMHeadModel`` ``state_dict`` of a :func:`fnn.models.GPT` built as
    :func:`import_hf_gpt2` builds it (LayerNorm, biases, a tied head or one without bias),
    the inverse of :func:`import_hf_gpt2`. ``lm_head.weight`` is written (the token table when
    tied), as ``GPT2LMHeadModel.state_dict()`` has it."""
    num_layers, _, num_heads, _ = params["blocks"]["layers"]["attention"]["query"]["w"].shape
    if "b" not in params["blocks"]["layers"]["attention"]["query"]:
        raise WeightsError("export_hf_gpt2: GPT-2 has biases in every projection; this GPT was "
                           "built with use_bias=False")
    tied = "head" not in params
    if not tied and np.any(np.asarray(params["head"].get("b", 0))):
        raise WeightsError("export_hf_gpt2: GPT-2's lm_head has no bias, and this model's head "
                           "bias is not zero")
    head = {} if tied else {"head": {"w": params["head"]["w"]}}
    out = to_torch({k: v for k, v in params.items() if k != "head"} | head, {},
                   gpt2_layout(num_layers, tied=tied), num_heads=num_heads)
    if tied:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
