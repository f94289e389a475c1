"""A run directory (a config's ``output_dir``) and the rules that keep a run from being lost.

``fnn train`` writes ``config.yaml`` (the config as run), ``metrics.jsonl`` (one JSON line per
evaluation), ``plot.png``, ``checkpoints/step_*``, ``inputs.json`` (the shape and dtype of one
input, the data's range of values and the model arguments the data filled in: the run's model
is rebuilt from them without its data), for data with a vocabulary ``vocab.json``, and for a
generative run ``samples/step_*.png``, a grid of samples at each evaluation.

- A fresh run into a directory that holds a run is refused unless ``--overwrite`` is given
  (``--resume`` continues it instead).
- A resumed run checks everything before it writes anything: the config is the run's (only how
  long and where it runs may change), the data's vocabulary is the run's, and a checkpoint
  restores. A corrupt latest checkpoint is set aside under another name (never deleted) and
  the newest intact one is used.
- :func:`plan` only reads; :func:`prepare` does the writes, after every check has passed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from fnn.app.values import ConfigError, load_yaml
from fnn.train.checkpoint import (CheckpointError, latest_step, restore_latest_intact,
                                  set_aside)

RUN_FILES = ("config.yaml", "metrics.jsonl", "plot.png", "vocab.json", "inputs.json")
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"  # a generative run's grids of samples, one PNG per evaluation
# what may change when a run is resumed: how long, where and how it runs, not what it trains
RESUMABLE = frozenset({"epochs", "output_dir", "parallel", "checkpoint", "max_bad_steps",
                       "host_malloc"})


class Plan(NamedTuple):
    """What a ``fnn train`` command will do to its run directory."""

    resume_step: int | None  # the checkpoint the run continues from; None: a fresh run
    corrupt: list[tuple[int, str]]  # newer checkpoints that do not restore: set aside
    clear: bool  # a fresh run over an earlier one (--overwrite): its files are removed first
    notes: list[str]  # what to tell the user before training


def existing_run(out: Path) -> list[str]:
    """The files of an earlier run in ``out`` (empty when it holds none)."""
    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES if (out / name).exists()]
    for folder in (CHECKPOINTS, SAMPLES):
        if (out / folder).is_dir() and any((out / folder).iterdir()):
            found.append(f"{folder}/")
    return found


def plan(out: Path, config: Any, vocab: Any, like: Any, steps: int, *, resume: bool,
         overwrite: bool) -> Plan:
    """Every check of a ``fnn train`` command against its run directory; reads only.

    ``like`` is the train state's structure (``jax.eval_shape`` of ``create_train_state``), to
    check that a checkpoint restores; ``steps`` the run's length."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a directory")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in "
                          "output_dir, or start it again")
    found = existing_run(out)
    if not found:
        notes = [f"no checkpoint in {out / CHECKPOINTS}: starting a fresh run"] if resume else []
        return Plan(None, [], False, notes)
    if not resume:
        if not overwrite:
            raise ConfigError(f"output_dir {out} already holds a run ({', '.join(found)}): pass "
                              f"--resume to continue it or --overwrite to start it again")
        return Plan(None, [], True, [f"--overwrite: removing the run in {out} "
                                     f"({', '.join(found)})"])
    _check_same_config(out, config)
    _check_same_vocab(out, vocab)
    root = out / CHECKPOINTS
    if latest_step(root) is None:
        return Plan(None, [], False, [f"no checkpoint in {root}: starting a fresh run"])
    try:
        _, _, step, corrupt = restore_latest_intact(root, like, load=False)
    except CheckpointError as e:
        raise ConfigError(f"cannot resume the run in {out}: {e}") from None
    if step > steps:
        raise ConfigError(f"cannot resume the run in {out}: its checkpoint is at step {step}, "
                          f"past this run's {steps} steps (epochs {config.epochs}); give more "
                          f"epochs")
    notes = [f"the checkpoint of step {bad} is corrupt ({' '.join(reason.split())}): resuming "
             f"from step {step}; the corrupt one is kept aside in {root}"
             for bad, reason in corrupt]
    return Plan(step, corrupt, False, notes + [f"resuming from step {step}"])


def _check_same_config(out: Path, config: Any) -> None:
    """The config must be the run's: everything but :data:`RESUMABLE` equal."""
    path = out / "config.yaml"
    if not path.exists():
        raise ConfigError(f"cannot resume the run in {out}: it has no config.yaml")
    try:
        previous = load_yaml(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same to the user
        raise ConfigError(f"cannot resume the run in {out}: its config.yaml does not read: "
                          f"{' '.join(str(e).split())}") from None
    current = dataclasses.asdict(config)
    previous = _as_written_today(previous or {}, current)
    differ = sorted(key for key in set(current) | set(previous or {})
                    if key not in RESUMABLE and current.get(key) != (previous or {}).get(key))
    if differ:
        detail = "; ".join(f"{key}: the run's {(previous or {}).get(key)!r}, now "
                           f"{current.get(key)!r}" for key in differ)
        raise ConfigError(f"cannot resume the run in {out} with another config ({detail}); "
                          f"only {', '.join(sorted(RESUMABLE))} may change")


def _as_written_today(previous: dict, current: dict) -> dict:
    """A run's config as this version writes it: the keys added since with the value that
    means what the run did (a run of 0.1 decayed every parameter: ``weight_decay_mask: all``;
    it had no ``init``, ``augment``, ``mix``, ``gan`` or ``diffusion``, and evaluated every
    epoch)."""
    if not isinstance(previous, dict):
        return {}
    previous = {key: None for key in ("init", "augment", "mix", "gan", "diffusion")} | previous
    if "eval_every" in current and "eval_every" not in previous:
        previous["eval_every"] = 1
    optimizer = previous.get("optimizer")
    if (isinstance(optimizer, dict) and "weight_decay_mask" not in optimizer
            and "weight_decay_mask" in current.get("optimizer", {})):
        previous["optimizer"] = optimizer | {"weight_decay_mask": "all"}
    return previous


def _check_same_vocab(out: Path, vocab: Any) -> None:
    """A language model's data must have the run's vocabulary: the trained ids mean those
    characters."""
    path = out / "vocab.json"
    if vocab is None and not path.exists():
        return
    if vocab is None or not path.exists():
        raise ConfigError(f"cannot resume the run in {out}: "
                          + ("it has no vocab.json" if vocab is not None else
                             "it has a vocab.json but the data has no vocabulary"))
    chars = read_vocab(path)
    if chars != vocab.chars:
        raise ConfigError(f"cannot resume the run in {out}: the data's vocabulary "
                          f"({len(vocab.chars)} characters) is not the run's ({len(chars)} "
                          f"characters in vocab.json), so the trained ids would decode to other "
                          f"characters; resume with the data the run was trained on")


def prepare(out: Path, config: Any, vocab: Any, run_plan: Plan,
            inputs: dict[str, Any] | None = None) -> None:
    """The writes of a planned command: the corrupt checkpoints set aside, an overwritten run's
    files removed, ``config.yaml`` and ``vocab.json`` written, ``metrics.jsonl`` started (or
    kept up to the resumed step)."""
    import yaml

    root = out / CHECKPOINTS
    for bad, _ in run_plan.corrupt:
        set_aside(root, bad)
    if run_plan.clear:
        for folder in (root, out / SAMPLES):
            if folder.exists():
                shutil.rmtree(folder)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    if vocab is not None:
        (out / "vocab.json").write_text(json.dumps({"chars": vocab.chars}))
    if inputs is not None:
        (out / "inputs.json").write_text(json.dumps(inputs))
    metrics = out / "metrics.jsonl"
    if run_plan.resume_step is None:
        metrics.write_text("")
        return
    rows = metrics.read_text().splitlines() if metrics.exists() else []
    metrics.write_text("".join(line + "\n" for line in rows
                               if _step_of(line, run_plan.resume_step + 1) <= run_plan.resume_step))


def _step_of(line: str, otherwise: int) -> int:
    """The step of a ``metrics.jsonl`` row (``otherwise`` for a line a killed run cut off)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return otherwise


def read_vocab(path: Path) -> list[str] | str:
    """The characters of a run's ``vocab.json``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))["chars"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a vocabulary of fnn's (expected {{\"chars\": ...}}): "
                          f"{' '.join(str(e).split())}") from None
