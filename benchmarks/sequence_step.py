"""Times one Adam train step of two sequence models built from fnn layers against the same
networks written by hand in JAX + optax (and in PyTorch eager when torch is importable), and
the compile time of a deep transformer.

    python benchmarks/sequence_step.py [--steps K] [--rounds R] [--only lstm|transformer|compile]
                                       [--host-malloc default|tuned]

Models (built here from fnn layers, not from ``fnn.models``):

- LSTM LM: ``serial(embed=Embedding(96, 64), lstm=LSTM(256), head=Dense(96))``, sequence
  64, batch 32. Timed five ways: fnn (the LSTM's own loop); fnn with the LSTM's loop removed,
  so that ``RNN`` runs its generic ``lax.scan`` over ``recur`` (what fnn did before the LSTM had
  a loop); by hand with the input projection of all time steps as one matmul before a
  ``lax.scan`` (the fair equivalent of the generic scan); by hand with a naive scan that
  projects each step's input inside the loop; PyTorch ``nn.LSTM``.
- Transformer LM: token ``Embedding(256, 256)`` + ``LearnedPositionEmbedding(128)`` +
  ``repeat(DecoderBlock(4, 1024), 4)`` (pre-LayerNorm, causal, exact GELU) + ``LayerNorm`` +
  ``Dense(256)``, sequence 128, batch 16. Hand-written: a Python loop over the layers with an
  explicit causal softmax attention. PyTorch: the same GPT with
  ``F.scaled_dot_product_attention``.

Every step computes the softmax cross-entropy over ``[B, T, V]`` logits with int labels, its
gradient, an ``optax.adam(1e-3)`` update and the accuracy. fnn's params are copied into the
other layouts and every first step must report the same loss (to 1e-4) before anything is
timed. Timing is as in ``train_step.py``: interleaved rounds (the order rotates between
rounds), median ms per step, median of the per-round ratios. Each row also shows the compiled
step's temporary buffers (``memory_analysis().temp_size_in_bytes``; JAX only) and the minor
page faults per step counted around the timed rounds (``getrusage``): a fresh, untouched page
costs a fault, so a step whose buffers are fresh memory every time pays for them again.

``--host-malloc tuned`` calls ``fnn.app.runtime.tune_host_malloc`` first (the whole process: fnn,
the hand-written steps and PyTorch alike), as ``host_malloc: tuned`` does for ``fnn train``.

``--only compile``: wall seconds of ``jit(...).lower(...).compile()`` of the Transformer LM's
train step with ``repeat`` over 2 and over 24 blocks (median of 3, each on a freshly built
model so that nothing is cached), and their ratio.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fnn
from fnn.losses import softmax_cross_entropy
from fnn.app.runtime import tune_host_malloc
from fnn.train import create_train_state, make_train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import (Runner, hand_train_step, jax_runner, print_setup,  # noqa: E402
                        timing_parser, torch_adam_runner, torch_available)

LEARNING_RATE = 1e-3
LOSS_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- fnn models

def lstm_lm() -> fnn.Layer:
    return fnn.serial(embed=fnn.Embedding(96, 64), lstm=fnn.LSTM(256), head=fnn.Dense(96))


def lstm_lm_generic_scan() -> fnn.Layer:
    """The same model with the LSTM's own loop removed: ``RNN`` then runs its generic scan over
    the cell's ``recur`` (the same params, values and gradients)."""
    return fnn.serial(embed=fnn.Embedding(96, 64),
                      lstm=fnn.RNN(fnn.LSTMCell(256)._replace(loop=None)), head=fnn.Dense(96))


def transformer_lm(layers: int = 4) -> fnn.Layer:
    return fnn.serial(embed=fnn.Embedding(256, 256), pos=fnn.LearnedPositionEmbedding(128),
                      blocks=fnn.repeat(fnn.DecoderBlock(4, 1024), layers),
                      norm=fnn.LayerNorm(), head=fnn.Dense(256))


# ----------------------------------------------------------------------------- hand-written JAX

def hand_lstm_params(p: dict) -> dict:
    return {"table": p["embed"]["table"], "w_i": p["lstm"]["w_i"], "w_h": p["lstm"]["w_h"],
            "b": p["lstm"]["b"], "head_w": p["head"]["w"], "head_b": p["head"]["b"]}


def _lstm_cell(c, z):
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * jnp.tanh(c)


def _lstm_lm(p, ids, naive: bool):
    x = jnp.take(p["table"], ids, axis=0)  # [B, T, 64]
    batch, hidden = ids.shape[0], p["w_h"].shape[0]
    zeros = jnp.zeros((batch, hidden), x.dtype)
    if naive:  # the input projection inside the loop, one [B, in] @ [in, 4H] per step
        def step(carry, x_t):
            h, c = carry
            c, h = _lstm_cell(c, x_t @ p["w_i"] + h @ p["w_h"] + p["b"])
            return (h, c), h
        xs = jnp.swapaxes(x, 0, 1)
    else:  # all time steps projected in one matmul before the scan
        def step(carry, z_t):
            h, c = carry
            c, h = _lstm_cell(c, z_t + h @ p["w_h"])
            return (h, c), h
        xs = jnp.swapaxes(x @ p["w_i"] + p["b"], 0, 1)
    _, hs = lax.scan(step, (zeros, zeros), xs)
    return jnp.swapaxes(hs, 0, 1) @ p["head_w"] + p["head_b"]


def hand_lstm_apply(p, ids):
    return _lstm_lm(p, ids, naive=False)


def naive_lstm_apply(p, ids):
    return _lstm_lm(p, ids, naive=True)


def hand_transformer_params(p: dict) -> dict:
    stacked = p["blocks"]["layers"]
    num = stacked["norm1"]["scale"].shape[0]
    layers = []
    for i in range(num):
        b = jax.tree.map(lambda a: a[i], stacked)
        att = b["attention"]
        f = att["query"]["w"].shape[0]
        layers.append({
            "ln1_s": b["norm1"]["scale"], "ln1_b": b["norm1"]["b"],
            **{f"w{n[0]}": att[n]["w"].reshape(f, -1) for n in ("query", "key", "value")},
            **{f"b{n[0]}": att[n]["b"].reshape(-1) for n in ("query", "key", "value")},
            "wo": att["out"]["w"].reshape(-1, f), "bo": att["out"]["b"],
            "ln2_s": b["norm2"]["scale"], "ln2_b": b["norm2"]["b"],
            "w1": b["ffn"]["up"]["w"], "b1": b["ffn"]["up"]["b"],
            "w2": b["ffn"]["down"]["w"], "b2": b["ffn"]["down"]["b"]})
    return {"tok": p["embed"]["table"], "pos": p["pos"]["table"], "layers": layers,
            "lnf_s": p["norm"]["scale"], "lnf_b": p["norm"]["b"],
            "head_w": p["head"]["w"], "head_b": p["head"]["b"]}


def _layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * scale + bias


def hand_transformer_apply(p, ids, num_heads: int = 4):
    batch, t = ids.shape
    x = jnp.take(p["tok"], ids, axis=0) + p["pos"][:t]
    causal = jnp.tril(jnp.ones((t, t), bool))
    for lp in p["layers"]:
        h = _layer_norm(x, lp["ln1_s"], lp["ln1_b"])
        f = h.shape[-1]
        d = f // num_heads
        q, k, v = ((h @ lp[f"w{n}"] + lp[f"b{n}"]).reshape(batch, t, num_heads, d)
                   for n in "qkv")
        s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
        s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
        a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)
        x = x + a.reshape(batch, t, f) @ lp["wo"] + lp["bo"]
        h = _layer_norm(x, lp["ln2_s"], lp["ln2_b"])
        x = x + jax.nn.gelu(h @ lp["w1"] + lp["b1"], approximate=False) @ lp["w2"] + lp["b2"]
    x = _layer_norm(x, p["lnf_s"], p["lnf_b"])
    return x @ p["head_w"] + p["head_b"]


# ----------------------------------------------------------------------------- PyTorch

def _t(a):
    import torch
    return torch.from_numpy(np.ascontiguousarray(a))


def torch_lstm(p: dict):
    import torch
    nn = torch.nn

    class LSTMLM(nn.Module):
        def __init__(self):
            super().__init__()
            vocab, emb = p["embed"]["table"].shape
            hidden = p["lstm"]["w_h"].shape[0]
            self.embed = nn.Embedding(vocab, emb)
            self.lstm = nn.LSTM(emb, hidden, batch_first=True)
            self.head = nn.Linear(hidden, p["head"]["w"].shape[1])
            with torch.no_grad():  # same gate order (i, f, g, o); b = bias_ih + bias_hh
                self.embed.weight.copy_(_t(p["embed"]["table"]))
                self.lstm.weight_ih_l0.copy_(_t(p["lstm"]["w_i"].T))
                self.lstm.weight_hh_l0.copy_(_t(p["lstm"]["w_h"].T))
                self.lstm.bias_ih_l0.copy_(_t(p["lstm"]["b"]))
                self.lstm.bias_hh_l0.zero_()
                self.head.weight.copy_(_t(p["head"]["w"].T))
                self.head.bias.copy_(_t(p["head"]["b"]))

        def forward(self, ids):
            return self.head(self.lstm(self.embed(ids))[0])

    return LSTMLM()


def torch_transformer(p: dict, num_heads: int = 4):
    import torch
    nn, F = torch.nn, torch.nn.functional
    hp = hand_transformer_params(p)

    def linear(w, b):
        layer = nn.Linear(*w.shape)
        with torch.no_grad():
            layer.weight.copy_(_t(w.T))
            layer.bias.copy_(_t(b))
        return layer

    def layer_norm(s, b):
        layer = nn.LayerNorm(s.shape[0], eps=1e-5)
        with torch.no_grad():
            layer.weight.copy_(_t(s))
            layer.bias.copy_(_t(b))
        return layer

    class Block(nn.Module):
        def __init__(self, lp):
            super().__init__()
            self.ln1 = layer_norm(lp["ln1_s"], lp["ln1_b"])
            self.qkv = linear(np.concatenate([lp["wq"], lp["wk"], lp["wv"]], 1),
                              np.concatenate([lp["bq"], lp["bk"], lp["bv"]]))
            self.out = linear(lp["wo"], lp["bo"])
            self.ln2 = layer_norm(lp["ln2_s"], lp["ln2_b"])
            self.fc1 = linear(lp["w1"], lp["b1"])
            self.fc2 = linear(lp["w2"], lp["b2"])

        def forward(self, x):
            b, t, f = x.shape
            q, k, v = (z.view(b, t, num_heads, f // num_heads).transpose(1, 2)
                       for z in self.qkv(self.ln1(x)).split(f, dim=-1))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(a.transpose(1, 2).reshape(b, t, f))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(*hp["tok"].shape)
            with torch.no_grad():
                self.tok.weight.copy_(_t(hp["tok"]))
            self.pos = nn.Parameter(_t(hp["pos"]).clone())
            self.blocks = nn.ModuleList(Block(lp) for lp in hp["layers"])
            self.lnf = layer_norm(hp["lnf_s"], hp["lnf_b"])
            self.head = linear(hp["head_w"], hp["head_b"])

        def forward(self, ids):
            x = self.tok(ids) + self.pos[:ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.lnf(x))

    return GPT()


def torch_runner(build: Callable[[dict], Any], params: dict, x: np.ndarray,
                 y: np.ndarray) -> Runner:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = build(jax.tree.map(np.asarray, params))
    tx, ty = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
    return torch_adam_runner(model, tx, ty)


# ----------------------------------------------------------------------------- cases

class Timed(NamedTuple):
    """One implementation under test: its runner and the compiled step's temporary buffers in
    bytes (``None`` for PyTorch)."""

    runner: Runner
    temp_bytes: int | None


CASES = {
    "lstm": dict(name="LSTM LM (emb 64, hidden 256, vocab 96), seq 64, batch 32",
                 model=lstm_lm, vocab=96, batch=32, seq=64,
                 fnn={"fnn": lstm_lm, "fnn-scan": lstm_lm_generic_scan},
                 hand={"hand": (hand_lstm_params, hand_lstm_apply),
                       "naive": (hand_lstm_params, naive_lstm_apply)},
                 torch=torch_lstm),
    "transformer": dict(name="Transformer LM (4 x d256, 4 heads, mlp 1024), seq 128, batch 16",
                        model=transformer_lm, vocab=256, batch=16, seq=128,
                        fnn={"fnn": transformer_lm},
                        hand={"hand": (hand_transformer_params, hand_transformer_apply)},
                        torch=torch_transformer),
}

LABELS = {
    "fnn": "fnn",
    "fnn-scan": "fnn, the LSTM's loop removed (generic scan over recur)",
    "hand": "hand JAX",
    "naive": "hand JAX, input projection inside the loop",
    "torch": "PyTorch eager",
}
LSTM_LABELS = {"hand": "hand JAX, input projection before the scan"}


def temp_bytes(step, *args) -> int:
    """The compiled step's temporary buffers (before the first call: the carry is donated)."""
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def make_runners(case: dict, with_torch: bool) -> dict[str, Timed]:
    optimizer = optax.adam(LEARNING_RATE)
    rng = np.random.default_rng(0)
    x = rng.integers(0, case["vocab"], (case["batch"], case["seq"])).astype(np.int32)
    y = rng.integers(0, case["vocab"], (case["batch"], case["seq"])).astype(np.int32)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)
    runners, params = {}, None
    for label, build in case["fnn"].items():
        model = build()
        ts = create_train_state(model, optimizer, jax.random.key(0), x)
        if params is None:  # a host copy: the device buffers get donated
            params = jax.tree.map(np.array, ts.params)
        step = make_train_step(model, optimizer, softmax_cross_entropy)
        temp = temp_bytes(step, ts, x_dev, y_dev)
        runners[label] = Timed(jax_runner(step, ts, x_dev, y_dev), temp)
    for label, (convert, apply) in case["hand"].items():
        hp = jax.tree.map(jnp.asarray, convert(params))
        step, carry = hand_train_step(apply, optimizer), (hp, optimizer.init(hp))
        temp = temp_bytes(step, carry, x_dev, y_dev)
        runners[label] = Timed(jax_runner(step, carry, x_dev, y_dev), temp)
    if with_torch:
        runners["torch"] = Timed(torch_runner(case["torch"], params, x, y), None)
    return runners


def check_same_loss(name: str, runners: dict[str, Timed]) -> None:
    ref = runners["fnn"].runner.first_loss
    line = f"{name}: first-step loss " + ", ".join(
        f"{label} {t.runner.first_loss:.6f}" for label, t in runners.items())
    print(line)
    for label, t in runners.items():
        if not abs(t.runner.first_loss - ref) <= LOSS_TOLERANCE * max(1.0, abs(ref)):
            raise SystemExit(f"{name}: fnn loss {ref!r} != {label} loss {t.runner.first_loss!r}: "
                             f"the steps do not compute the same thing")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(runners: dict[str, Timed], steps: int, rounds: int):
    """Per implementation, the ms per step and the minor page faults per step of every round;
    the order rotates by one each round, so that no implementation always follows the same
    one."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            before, start = minor_faults(), time.perf_counter()
            runners[name].runner.run(steps)
            times[name].append((time.perf_counter() - start) * 1e3 / steps)
            faults[name].append((minor_faults() - before) / steps)
    return times, faults


def ratio(times, a, b) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def table(case: dict, runners: dict[str, Timed], times, faults, labels: dict[str, str]):
    """One row per implementation: ms per step, the median per-round ratio fnn / it (below 1
    fnn is faster), temporary MiB of the compiled step and page faults per step."""
    rows = [f"| {case['name']} | ms per step | fnn / this | temp MiB | page faults per step |",
            "|---|---:|---:|---:|---:|"]
    for name, timed in runners.items():
        temp = "n/a" if timed.temp_bytes is None else f"{timed.temp_bytes / 2**20:.1f}"
        rows.append(f"| {labels.get(name, LABELS[name])} | {statistics.median(times[name]):.2f} | "
                    f"{ratio(times, 'fnn', name):.3f} | {temp} | "
                    f"{statistics.median(faults[name]):.0f} |")
    return rows


# ----------------------------------------------------------------------------- compile time

def compile_seconds(layers: int) -> tuple[float, float]:
    """(lower, compile) wall seconds of the Transformer LM's train step, on a new model."""
    optimizer = optax.adam(LEARNING_RATE)
    model = transformer_lm(layers)  # new closures: nothing traced or compiled before is reused
    x = jax.ShapeDtypeStruct((16, 128), jnp.int32)
    ts = jax.eval_shape(lambda k: create_train_state(model, optimizer, k, x),
                        jax.random.key(0))
    step = make_train_step(model, optimizer, softmax_cross_entropy)
    start = time.perf_counter()
    lowered = step.lower(ts, x, x)
    mid = time.perf_counter()
    lowered.compile()
    return mid - start, time.perf_counter() - mid


def compile_table(repeats: int = 3) -> list[str]:
    rows, totals = [], {}
    for layers in (2, 24):
        samples = [compile_seconds(layers) for _ in range(repeats)]
        lower = statistics.median(s[0] for s in samples)
        comp = statistics.median(s[1] for s in samples)
        totals[layers] = statistics.median(s[0] + s[1] for s in samples)
        rows.append(f"| repeat(DecoderBlock, {layers}) | {lower:.2f} | {comp:.2f} | "
                    f"{totals[layers]:.2f} |")
    return (["| Transformer LM train step | trace+lower s | compile s | total s |",
             "|---|---:|---:|---:|"] + rows
            + ["", f"ratio 24 layers / 2 layers: {totals[24] / totals[2]:.2f}x (goal <= 1.5x)"])


def main(argv=None) -> None:
    parser = timing_parser(__doc__, steps=5, rounds=10, only=sorted(CASES) + ["compile"],
                           only_help="run one part only")
    parser.add_argument("--host-malloc", choices=["default", "tuned"], default="default",
                        help="tuned: fnn.app.runtime.tune_host_malloc() before anything runs")
    args = parser.parse_args(argv)
    if args.host_malloc == "tuned" and not tune_host_malloc():
        raise SystemExit("--host-malloc tuned needs glibc")

    with_torch = torch_available()
    print_setup(args)
    print(f"host malloc: {args.host_malloc}")

    tables = []
    keys = [args.only] if args.only else list(CASES) + ["compile"]
    if "lstm" in keys:
        runners = make_runners(CASES["lstm"], with_torch)
        check_same_loss("LSTM LM", runners)
        times, faults = time_interleaved(runners, args.steps, args.rounds)
        tables.append(table(CASES["lstm"], runners, times, faults, LSTM_LABELS) + [
            "", f"fnn / hand JAX (projection before the scan): "
                f"{ratio(times, 'fnn', 'hand'):.3f} (goal <= 1.02); fnn / naive hand JAX "
                f"(projection inside the loop): {ratio(times, 'fnn', 'naive'):.3f} (goal < 1)"])
    if "transformer" in keys:
        runners = make_runners(CASES["transformer"], with_torch)
        check_same_loss("Transformer LM", runners)
        times, faults = time_interleaved(runners, args.steps, args.rounds)
        tables.append(table(CASES["transformer"], runners, times, faults, {}))
    if "compile" in keys:
        tables.append(compile_table())

    for rows in tables:
        print()
        print("\n".join(rows))


if __name__ == "__main__":
    main()
