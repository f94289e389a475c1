"""Times one Adam train step of fnn against the same network written by hand in JAX + optax
(and in PyTorch eager when torch is importable).

    python benchmarks/train_step.py [--steps K] [--rounds R] [--only mlp|cnn]

Models: (a) MLP 784-512-512-10 (relu), batch 128; (b) LeNet on 28x28x1 NHWC (conv 5x5x32 SAME,
relu, maxpool 2, conv 5x5x64 SAME, relu, maxpool 2, dense 256, relu, dense 10), batch 64. Every
step computes the softmax cross-entropy, its gradient, an ``optax.adam(1e-3)`` update and the
accuracy. The hand-written step runs twice: as is, and skipping non-finite steps as fnn's step
does (``hand + skip``: a ``lax.cond`` on the finiteness of the loss and every gradient), which
is the same work as fnn's. Before timing, fnn's params are copied into the hand-written layout
and every step must give the same loss, so that they time the same computation.

All implementations are compiled (or warmed up) first, then timed in interleaved rounds: each
round runs K steps of each (torch first, then the JAX steps in an order that rotates between
rounds) and blocks on the last result. The table shows the median milliseconds per step and the
median over rounds of the per-round ratios of fnn to the hand-written steps (side-by-side
ratios cancel the machine's load drift).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fnn.losses import softmax_cross_entropy
from fnn.models import MLP, LeNet
from fnn.train import create_train_state, make_train_step

LEARNING_RATE = 1e-3
LOSS_TOLERANCE = 1e-5
JAX_STEPS = ("fnn", "hand", "hand_skip")  # hand_skip: hand-written, skipping non-finite steps


class Runner(NamedTuple):
    """One implementation under test: ``run(k)`` takes ``k`` train steps and blocks on the
    result; ``first_loss`` is the loss its first step reported (on the shared params)."""

    run: Callable[[int], None]
    first_loss: float


class Case(NamedTuple):
    name: str
    fnn_model: Any
    hand_params: Callable[[dict], Any]  # fnn params -> the hand-written layout
    hand_apply: Callable[[Any, jax.Array], jax.Array]  # (params, x) -> logits
    batch: int
    input_shape: tuple[int, ...]
    torch_model: Callable[[dict], Any]  # fnn params (numpy) -> a torch.nn.Module


# ----------------------------------------------------------------------------- hand-written JAX

def hand_mlp_params(p: dict) -> list[tuple[jax.Array, jax.Array]]:
    return [(p[name]["w"], p[name]["b"]) for name in ("dense1", "dense2", "head")]


def hand_mlp_apply(params, x):
    *hidden, (w_out, b_out) = params
    for w, b in hidden:
        x = jnp.maximum(x @ w + b, 0.0)
    return x @ w_out + b_out


def hand_cnn_params(p: dict) -> dict[str, jax.Array]:
    return {f"{name}_{leaf}": p[name][leaf]
            for name in ("conv1", "conv2", "fc", "head") for leaf in ("w", "b")}


def _conv_relu_pool(x, w, b):
    y = lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.maximum(y + b, 0.0)
    return lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def hand_cnn_apply(p, x):
    x = _conv_relu_pool(x, p["conv1_w"], p["conv1_b"])
    x = _conv_relu_pool(x, p["conv2_w"], p["conv2_b"])
    x = x.reshape(x.shape[0], -1)
    x = jnp.maximum(x @ p["fc_w"] + p["fc_b"], 0.0)
    return x @ p["head_w"] + p["head_b"]


def hand_train_step(apply, optimizer, skip_nonfinite: bool = False):
    """The hand-written step ``((params, opt_state), x, y) -> ((params, opt_state), metrics)``,
    jitted with the carried state donated, as fnn's step is. With ``skip_nonfinite`` it does
    what fnn's step does besides: when the loss or a gradient is not finite, a ``lax.cond``
    keeps params and optimizer state as they were."""

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def objective(params, x, y):
        logits = apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    def step(carry, x, y):
        params, opt_state = carry
        (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(params, x, y)
        if skip_nonfinite:
            ok = jnp.isfinite(loss)
            for g in jax.tree.leaves(grads):
                ok = ok & jnp.all(jnp.isfinite(g))
            params, opt_state = lax.cond(ok, update, lambda p, o, g: (p, o), params, opt_state,
                                         grads)
        else:
            params, opt_state = update(params, opt_state, grads)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
        return (params, opt_state), {"loss": loss, "accuracy": accuracy}

    return jax.jit(step, donate_argnums=(0,))


# ----------------------------------------------------------------------------- PyTorch

def torch_mlp(p: dict):
    import torch

    layers = []
    for name in ("dense1", "dense2", "head"):
        w = p[name]["w"]
        linear = torch.nn.Linear(*w.shape)
        with torch.no_grad():  # torch stores [out, in]
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.copy_(torch.from_numpy(p[name]["b"]))
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def torch_cnn(p: dict):
    import torch

    def conv(name):
        w = p[name]["w"]  # HWIO -> torch's OIHW
        layer = torch.nn.Conv2d(w.shape[2], w.shape[3], w.shape[:2], padding="same")
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
            layer.bias.copy_(torch.from_numpy(p[name]["b"]))
        return layer

    def dense(name, features_in):
        w = p[name]["w"]
        layer = torch.nn.Linear(*w.shape)
        if features_in is not None:
            # fnn flattens NHWC, torch NCHW: permute the rows of fc's weight to match
            h, w_, c = features_in
            w = w.reshape(h, w_, c, -1).transpose(2, 0, 1, 3).reshape(h * w_ * c, -1)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w.T.copy()))
            layer.bias.copy_(torch.from_numpy(p[name]["b"]))
        return layer

    nn = torch.nn
    c2 = p["conv2"]["w"].shape[-1]
    return nn.Sequential(conv("conv1"), nn.ReLU(), nn.MaxPool2d(2),
                         conv("conv2"), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         dense("fc", (7, 7, c2)), nn.ReLU(), dense("head", None))


def torch_runner(case: Case, params: dict, x: np.ndarray, y: np.ndarray) -> Runner:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = case.torch_model(jax.tree.map(np.asarray, params))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if x.ndim == 4 else x)
    return torch_adam_runner(model, tx, torch.from_numpy(y.astype(np.int64)))


def torch_adam_runner(model, tx, ty) -> Runner:
    """A PyTorch eager Adam step on ``model(tx)`` against integer labels ``ty`` (logits
    ``[..., classes]`` flattened over the leading axes for the cross-entropy)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(tx)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ty.reshape(-1))
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(-1) == ty).float().mean()
        return loss, accuracy

    first_loss = step()[0].item()

    def run(k):  # eager: each step has finished when it returns
        for _ in range(k):
            step()

    return Runner(run, first_loss)


# ----------------------------------------------------------------------------- runners

def jax_runner(step, carry, x, y) -> Runner:
    carry, metrics = step(carry, x, y)  # compiles; the carry passed in is donated
    first_loss = float(metrics["loss"])
    box = [carry]

    def run(k):
        c = box[0]
        for _ in range(k):
            c, _ = step(c, x, y)
        jax.block_until_ready(c)
        box[0] = c

    return Runner(run, first_loss)


def make_runners(case: Case, with_torch: bool) -> dict[str, Runner]:
    optimizer = optax.adam(LEARNING_RATE)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.batch,) + case.input_shape, dtype=np.float32)
    y = rng.integers(0, 10, case.batch).astype(np.int32)
    ts = create_train_state(case.fnn_model, optimizer, jax.random.key(0), x)
    params = jax.tree.map(np.array, ts.params)  # a host copy: the device buffers get donated

    def hand_carry():  # a carry of its own for each step: the steps donate theirs
        hand_params = jax.tree.map(jnp.asarray, case.hand_params(params))
        return hand_params, optimizer.init(hand_params)

    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)
    runners = {
        "fnn": jax_runner(make_train_step(case.fnn_model, optimizer, softmax_cross_entropy),
                          ts, x_dev, y_dev),
        "hand": jax_runner(hand_train_step(case.hand_apply, optimizer), hand_carry(), x_dev,
                           y_dev),
        "hand_skip": jax_runner(hand_train_step(case.hand_apply, optimizer, skip_nonfinite=True),
                                hand_carry(), x_dev, y_dev),
    }
    if with_torch:
        runners["torch"] = torch_runner(case, params, x, y)
    return runners


def check_same_loss(case: Case, runners: dict[str, Runner]) -> None:
    fnn_loss = runners["fnn"].first_loss
    for name in JAX_STEPS[1:]:
        hand_loss = runners[name].first_loss
        if not abs(fnn_loss - hand_loss) <= LOSS_TOLERANCE * max(1.0, abs(fnn_loss)):
            raise SystemExit(f"{case.name}: fnn loss {fnn_loss!r} != {name} loss "
                             f"{hand_loss!r}: the steps do not compute the same thing")
    line = (f"{case.name}: first-step loss fnn {fnn_loss:.6f}, hand-written "
            f"{runners['hand'].first_loss:.6f}")
    if "torch" in runners:
        line += f", torch {runners['torch'].first_loss:.6f}"
    print(line)


def time_interleaved(runners: dict[str, Runner], steps: int, rounds: int):
    """Per implementation, the ms per step of every round.

    Each round runs torch (if present) first, then the JAX steps in an order that rotates by
    one between rounds, so that no JAX step systematically follows torch (whose worker threads
    keep spinning for a moment after a step) or another.
    """
    jax_steps = [name for name in JAX_STEPS if name in runners]
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        shift = r % len(jax_steps)
        order = ([name for name in runners if name not in jax_steps]
                 + jax_steps[shift:] + jax_steps[:shift])
        for name in order:
            start = time.perf_counter()
            runners[name].run(steps)
            times[name].append((time.perf_counter() - start) * 1e3 / steps)
    return times


CASES = {
    "mlp": Case("MLP 784-512-512-10, batch 128", MLP([512, 512], 10), hand_mlp_params,
                hand_mlp_apply, 128, (784,), torch_mlp),
    "cnn": Case("LeNet 28x28x1, batch 64", LeNet(), hand_cnn_params, hand_cnn_apply, 64,
                (28, 28, 1), torch_cnn),
}


def torch_available() -> bool:
    """Whether PyTorch can be imported; says so when it cannot (its column is skipped)."""
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        print("torch is not importable: the PyTorch column is skipped")
        return False


def print_table(header: list[str], rows: list[tuple[str, ...]], text_columns: int = 1) -> None:
    """A Markdown table after a blank line; columns after the first ``text_columns`` are
    right-aligned numbers."""
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * text_columns + "---:|" * (len(header) - text_columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def timing_parser(doc: str, steps: int, rounds: int, only: list[str],
                  only_help: str = "run one model only") -> argparse.ArgumentParser:
    """The command line every timing script shares: ``--steps K`` (train steps per timed
    round), ``--rounds R`` (interleaved rounds) and ``--only`` one of ``only``; ``doc`` is the
    script's docstring, whose first paragraph describes it."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=steps, help="train steps per timed round")
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds")
    parser.add_argument("--only", choices=only, help=only_help)
    return parser


def print_setup(args) -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cores; "
          f"{args.rounds} rounds of {args.steps} steps")


def main(argv=None) -> None:
    args = timing_parser(__doc__, steps=10, rounds=15, only=sorted(CASES)).parse_args(argv)

    with_torch = torch_available()
    print_setup(args)

    rows = []
    for key in [args.only] if args.only else list(CASES):
        case = CASES[key]
        runners = make_runners(case, with_torch)
        check_same_loss(case, runners)
        times = time_interleaved(runners, args.steps, args.rounds)
        ratios = [f"{statistics.median(f / h for f, h in zip(times['fnn'], times[name])):.3f}"
                  for name in JAX_STEPS[1:]]
        torch_ms = f"{statistics.median(times['torch']):.2f}" if with_torch else "n/a"
        rows.append((case.name,) + tuple(f"{statistics.median(times[name]):.2f}"
                                         for name in JAX_STEPS) + tuple(ratios) + (torch_ms,))

    print_table(["model", "fnn ms", "hand-written JAX ms", "hand + skip ms", "ratio fnn/hand",
                 "ratio fnn/(hand + skip)", "torch eager ms"], rows)


if __name__ == "__main__":
    main()
