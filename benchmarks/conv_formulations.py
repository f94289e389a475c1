"""Where the time of the LeNet train step goes on XLA:CPU, and which formulations of its
convolutions and max-pools are faster while computing the same thing.

    python benchmarks/conv_formulations.py [--steps K] [--rounds R] [--profile]

Every variant is the LeNet Adam step of ``train_step.py`` (batch 64, 28x28x1, NHWC params),
written with one choice of convolution, max-pool and XLA compiler options:

- conv ``nhwc``: ``lax.conv_general_dilated`` on NHWC/HWIO, as fnn does;
  ``nchw``: the same convolution on NCHW/OIHW, with transposes around it;
  ``im2col``: the kernel-sized shifted slices concatenated, then one matmul.
- pool ``reduce_window``: ``lax.reduce_window(max)``, as fnn's MaxPool did (its gradient is XLA's
  select-and-scatter); ``reshape_max``: non-overlapping windows as a reshape and ``jnp.max``
  (ties share the gradient); ``first_max``: fnn's ``MaxPool`` now, the reshape and max with a
  JVP that sends the whole gradient to the first maximum of each window, like select-and-scatter.
- XLA options, per compilation: the default, YNNPACK fusions off, XNNPACK off, oneDNN on.

First every variant's loss and gradients are compared with the baseline on random data, and the
pools' gradients on an input with ties. Then all variants are timed side by side in one process:
each round runs K steps of each, in an order reversed every other round, and the table shows
the median ms per step, the median per-round ratio to the baseline, and how many cores the
process kept busy (CPU time over wall time). On Linux, the second convolution is then timed
alone with XLA's threads pinned to one core and to all, with YNNPACK and with Eigen. ``--profile`` also
prints, per XLA op of the baseline and the fastest variant, the time its thunks took (summed
over threads) from a ``jax.profiler`` trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

if "--profile" in sys.argv:  # per-op trace events; XLA reads its flags once, at start-up
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

from fnn.layers import MaxPool  # noqa: E402

BATCH, SIZE, FEATURES, KERNEL, HIDDEN, CLASSES = 64, 28, (32, 64), 5, 256, 10


# ----------------------------------------------------------------------------- convolutions

def conv_nhwc(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_nchw(x, w):
    y = lax.conv_general_dilated(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1),
                                 "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y.transpose(0, 2, 3, 1)


def conv_im2col(x, w):
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    # patches[..., (i * kw + j) * cin + c] = xp[:, y + i, x + j, c]: the order of w.reshape
    patches = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(kh)
                               for j in range(kw)], axis=-1)
    return patches @ w.reshape(kh * kw * cin, cout)


CONVS = {"nhwc": conv_nhwc, "nchw": conv_nchw, "im2col": conv_im2col}


# ----------------------------------------------------------------------------- max-pools (2x2)

def pool_reduce_window(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def pool_reshape_max(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max((2, 4))


def pool_first_max(x):
    return MaxPool((2, 2)).apply({}, {}, x)[0]


POOLS = {"reduce_window": pool_reduce_window, "reshape_max": pool_reshape_max,
         "first_max": pool_first_max}

OPTIONS = {
    "default": {},
    "ynn off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "xnnpack off": {"xla_cpu_use_xnnpack": False},
    "onednn on": {"xla_cpu_use_onednn": True},
}

# (conv, pool, XLA options); the first is the baseline, fnn's formulation before this study
VARIANTS = [
    ("nhwc", "reduce_window", "default"),
    ("nhwc", "reshape_max", "default"),
    ("nhwc", "first_max", "default"),
    ("nchw", "reduce_window", "default"),
    ("nchw", "first_max", "default"),
    ("im2col", "reduce_window", "default"),
    ("im2col", "first_max", "default"),
    ("nhwc", "reduce_window", "ynn off"),
    ("nhwc", "first_max", "ynn off"),
    ("nhwc", "reduce_window", "xnnpack off"),
    ("nhwc", "reduce_window", "onednn on"),
]


# ----------------------------------------------------------------------------- the model

def init_params(key):
    keys = iter(jax.random.split(key, 4))
    params, cin = {}, 1
    for i, cout in enumerate(FEATURES, start=1):
        params[f"conv{i}"] = {"w": jax.random.normal(next(keys), (KERNEL, KERNEL, cin, cout))
                              / np.sqrt(KERNEL * KERNEL * cin),
                              "b": jnp.full((cout,), 0.1)}
        cin = cout
    fan_in = (SIZE // 4) ** 2 * cin
    for name, (n_in, n_out) in (("fc", (fan_in, HIDDEN)), ("head", (HIDDEN, CLASSES))):
        params[name] = {"w": jax.random.normal(next(keys), (n_in, n_out)) / np.sqrt(n_in),
                        "b": jnp.zeros((n_out,))}
    return params


def make_loss(conv, pool):
    def apply(p, x):
        for i in range(1, len(FEATURES) + 1):
            x = pool(jnp.maximum(conv(x, p[f"conv{i}"]["w"]) + p[f"conv{i}"]["b"], 0.0))
        x = jnp.maximum(x.reshape(x.shape[0], -1) @ p["fc"]["w"] + p["fc"]["b"], 0.0)
        return x @ p["head"]["w"] + p["head"]["b"]

    def loss(p, x, y):
        logits = apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    return loss


def make_step(loss, optimizer):
    def step(carry, x, y):
        params, opt_state = carry
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
        return (optax.apply_updates(params, updates), opt_state), {"loss": value,
                                                                   "accuracy": accuracy}
    return step


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, SIZE, SIZE, 1), dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, CLASSES, BATCH).astype(np.int32))


def name_of(variant):
    conv, pool, options = variant
    return f"{conv} + {pool}" + ("" if options == "default" else f" ({options})")


# ----------------------------------------------------------------------------- checks

def max_rel_diff(a, b):
    """Largest |a - b| over every leaf, relative to that leaf's largest |b|."""
    return max(float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_variants(params, x, y):
    """Loss and gradients of every variant against the baseline's, both compiled."""
    print("loss and gradients against the baseline, random data (relative max |diff|):")
    results = {}
    for variant in VARIANTS:
        conv, pool, options = variant
        fn = jax.jit(jax.value_and_grad(make_loss(CONVS[conv], POOLS[pool]), has_aux=True))
        results[variant] = fn.lower(params, x, y).compile(OPTIONS[options])(params, x, y)
    (base_loss, _), base_grads = results[VARIANTS[0]]
    for variant, ((loss, _), grads) in results.items():
        print(f"  {name_of(variant):40s} loss {float(loss):.6f} "
              f"(diff {abs(float(loss - base_loss)):.1e}), grads {max_rel_diff(grads, base_grads):.1e}")


def check_pool_ties():
    """Gradients of the pools on windows with ties (constant patches, as in MNIST backgrounds)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    x[:, :4, :4, :] = 1.0  # four whole windows of equal values
    x = jnp.asarray(x)
    g = jnp.asarray(rng.standard_normal((2, 3, 3, 3)).astype(np.float32))
    ref = jax.vjp(pool_reduce_window, x)[1](g)[0]
    print("max-pool gradients on windows with ties, max |diff| to reduce_window:")
    for name, pool in POOLS.items():
        print(f"  {name:14s} {float(jnp.max(jnp.abs(jax.vjp(pool, x)[1](g)[0] - ref))):.1e}")


# ----------------------------------------------------------------------------- timing

def compile_runner(variant, params, x, y):
    conv, pool, options = variant
    optimizer = optax.adam(1e-3)
    jitted = jax.jit(make_step(make_loss(CONVS[conv], POOLS[pool]), optimizer),
                     donate_argnums=(0,))
    carry = jax.tree.map(jnp.copy, (params, optimizer.init(params)))
    step = jitted.lower(carry, x, y).compile(OPTIONS[options])
    box = [step(carry, x, y)[0]]  # warm-up

    def run(k):
        c = box[0]
        for _ in range(k):
            c, _ = step(c, x, y)
        box[0] = jax.block_until_ready(c)

    return step, box, run


def time_variants(runners, steps, rounds):
    """Per variant and round: ms per step, and the process's CPU time over the wall time (the
    number of cores kept busy; XLA's threads are this process's)."""
    names = list(runners)
    times = {name: [] for name in names}
    cores = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cpu, start = time.process_time(), time.perf_counter()
            runners[name](steps)
            wall = time.perf_counter() - start
            times[name].append(wall * 1e3 / steps)
            cores[name].append((time.process_time() - cpu) / wall)
    return times, cores


def _pin_threads(cpus):
    """Restricts every thread of this process, XLA's workers included, to ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cpus)


def conv_threads(rounds):
    """The second convolution alone (1.28 GFLOP), YNNPACK against Eigen, on one core and on all:
    ms per call and cores busy. Shows whether each kernel uses more than one core."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, SIZE // 2, SIZE // 2, FEATURES[0]), np.float32))
    w = jnp.asarray(rng.standard_normal((KERNEL, KERNEL) + FEATURES, np.float32))
    calls = {name: jax.jit(conv_nhwc).lower(x, w).compile(OPTIONS[name])
             for name in ("default", "ynn off")}
    every = os.sched_getaffinity(0)
    results = collections.defaultdict(list)
    try:
        for _ in range(rounds):
            for cpus in ({min(every)}, every):
                _pin_threads(cpus)
                for name, call in calls.items():
                    cpu, start = time.process_time(), time.perf_counter()
                    for _ in range(10):
                        out = call(x, w)
                    out.block_until_ready()
                    wall = time.perf_counter() - start
                    results[name, len(cpus)].append((wall * 100, (time.process_time() - cpu) / wall))
    finally:
        _pin_threads(every)
    print("\nconv2 forward alone (YNNPACK is XLA's default; 'ynn off' falls back to Eigen):\n")
    print("| kernel | cores allowed | ms per call | cores busy |")
    print("|---|---:|---:|---:|")
    for (name, n), values in sorted(results.items()):
        print(f"| {'YNNPACK' if name == 'default' else 'Eigen'} | {n} | "
              f"{statistics.median(v[0] for v in values):.2f} | "
              f"{statistics.median(v[1] for v in values):.2f} |")


def profile(step, box, x, y, steps=10):
    """Thread-milliseconds per step of each XLA op, from a jax.profiler trace."""
    from jax._src.lib import _profile_data  # jaxlib's reader of the trace files

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            c = box[0]
            for _ in range(steps):
                c, _ = step(c, x, y)
            box[0] = jax.block_until_ready(c)
        path = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]
        data = _profile_data.ProfileData.from_file(path)
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):  # XLA's worker threads
                for event in line.events:
                    if not event.name.startswith("ThunkExecutor"):
                        per_op[event.name] += event.duration_ns / 1e6 / steps
    return per_op


def print_profile(title, per_op, top=12):
    # Eigen's convolutions (XLA options "ynn off") run in tasks that are not traced, so they are
    # missing from these lists; YNNPACK's, dots and loop fusions are there.
    total = sum(per_op.values())
    print(f"\n{title}: {total:.1f} thread-ms per step in XLA ops; the top {top}:")
    for name, ms in per_op.most_common(top):
        print(f"  {ms:7.2f} ms  {100 * ms / total:5.1f}%  {name}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="train steps per timed round")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--profile", action="store_true",
                        help="print per-op times of the baseline and the fastest variant")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}")

    params = init_params(jax.random.key(0))
    x, y = batch()
    check_variants(params, x, y)
    check_pool_ties()

    compiled = {name_of(v): compile_runner(v, params, x, y) for v in VARIANTS}
    times, cores = time_variants({name: run for name, (_, _, run) in compiled.items()},
                                 args.steps, args.rounds)
    base = name_of(VARIANTS[0])
    print(f"\n{args.rounds} rounds of {args.steps} steps\n")
    print("| conv + pool (XLA options) | ms per step | ratio to baseline | cores busy |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times[base]))
        print(f"| {name} | {statistics.median(ts):.1f} | {ratio:.3f} | "
              f"{statistics.median(cores[name]):.2f} |")

    if hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task"):
        conv_threads(args.rounds)

    if args.profile:
        fastest = min(times, key=lambda name: statistics.median(times[name]))
        for name in dict.fromkeys([base, fastest]):
            step, box, _ = compiled[name]
            print_profile(name, profile(step, box, x, y))


if __name__ == "__main__":
    main()
