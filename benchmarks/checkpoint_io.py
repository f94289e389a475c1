"""Times saving and restoring a whole train state with ``fnn.train.checkpoint``.

    python benchmarks/checkpoint_io.py [--params N] [--rounds R]

The train state is that of an MLP ``h -> h -> h -> h -> h`` (four Dense layers of ``h x h``
weights, ``h`` chosen so that there are about N parameters; 10M by default) with its
``optax.adam(1e-3)`` state: three float32 copies of the parameters (params, mu, nu), about
120 MB at 10M, plus the step counters and the typed PRNG key.

Each round saves it into a temporary directory (``save_checkpoint``: write, sha256 and fsync of
every byte, rename, fsync of the directory) and restores it (``restore_checkpoint``: manifest
and shape checks, read, sha256 of every array, transfer to jax arrays). A baseline times the
same bytes written to one file with one fsync and read back with no checks, which is what the
disk and the page cache allow. Before timing, the restored state must be bit-identical to the
saved one; the script exits with an error otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnn.models import MLP
from fnn.train import create_train_state
from fnn.train.checkpoint import restore_checkpoint, save_checkpoint


def make_train_state(num_params: int):
    """The train state of an MLP with four ``h x h`` Dense layers, ``4 h^2 ~ num_params``."""
    h = max(1, round(math.sqrt(num_params / 4)))

    def make():
        return create_train_state(MLP([h, h, h], h), optax.adam(1e-3), jax.random.key(0),
                                  jnp.zeros((1, h), jnp.float32))

    return make(), jax.eval_shape(make)


def host_bytes(tree) -> list[np.ndarray]:
    """Every leaf's bytes on the host (key arrays as their key data)."""
    def raw(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).reshape(-1).view(np.uint8)

    return [raw(x) for x in jax.tree.leaves(tree)]


def check_bit_identical(restored, saved) -> None:
    if jax.tree.structure(restored) != jax.tree.structure(saved) or not all(
            np.array_equal(a, b) for a, b in zip(host_bytes(restored), host_bytes(saved))):
        raise SystemExit("the restored train state differs from the saved one")


def baseline_round(arrays: list[np.ndarray], path: pathlib.Path) -> tuple[float, float]:
    """Seconds to write ``arrays`` to one file with one fsync, and to read them back."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        for a in arrays:
            f.write(a)
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as f:
        for a in arrays:
            f.readinto(np.empty_like(a))
    return write, time.perf_counter() - start


def checkpoint_round(state, like, root: pathlib.Path, step: int) -> tuple[float, float]:
    """Seconds to save ``state`` as a checkpoint and to restore it onto jax arrays."""
    start = time.perf_counter()
    save_checkpoint(root, step, state, metadata={"position": step})
    save = time.perf_counter() - start
    start = time.perf_counter()
    restored, _ = restore_checkpoint(root, like, step=step)
    jax.block_until_ready(restored)
    return save, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000,
                        help="about this many model parameters (the state holds 3x as many)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    args = parser.parse_args(argv)

    state, like = make_train_state(args.params)
    arrays = host_bytes(state)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    mb = sum(a.nbytes for a in arrays) / 1e6
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cores; "
          f"{num_params:,} params, train state {mb:.1f} MB in {len(arrays)} arrays; "
          f"{args.rounds} rounds")

    with tempfile.TemporaryDirectory(prefix="fnn-checkpoint-io-") as tmp:
        root = pathlib.Path(tmp)
        save_checkpoint(root / "check", 0, state)
        check_bit_identical(restore_checkpoint(root / "check", like)[0], state)
        shutil.rmtree(root / "check")
        times = {"save": [], "restore": [], "write": [], "read": []}
        for r in range(args.rounds):
            save, restore = checkpoint_round(state, like, root / "ckpt", r)
            shutil.rmtree(root / "ckpt")  # each round writes a new directory, as in training
            write, read = baseline_round(arrays, root / "raw.bin")
            for name, value in zip(times, (save, restore, write, read)):
                times[name].append(value)

    rows = [("save_checkpoint", "save"), ("restore_checkpoint", "restore"),
            ("baseline: one file write + fsync", "write"),
            ("baseline: one file read, no checks", "read")]
    print()
    print("| operation | median s | MB/s |")
    print("|---|---:|---:|")
    for label, name in rows:
        seconds = statistics.median(times[name])
        print(f"| {label} | {seconds:.3f} | {mb / seconds:.0f} |")


if __name__ == "__main__":
    main()
