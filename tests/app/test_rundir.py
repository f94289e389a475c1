"""The run directory's rules, on their own: plan only reads, prepare writes only what the plan
says, a resume checks the config, the vocabulary and a restorable checkpoint first."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
import yaml

from fnn.app import rundir
from fnn.app.values import ConfigError
from fnn.train.checkpoint import list_steps, save_checkpoint

ROOT = Path(__file__).parents[2]


@dataclasses.dataclass
class Config:
    model: dict = dataclasses.field(default_factory=lambda: {"name": "mlp"})
    epochs: int = 2
    output_dir: str = "runs/x"
    seed: int = 0


TREE = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.array(0)}
LIKE = jax.eval_shape(lambda: TREE)


def _snapshot(path):
    """Every file under ``path`` with its bytes: to show that nothing changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _run(tmp_path, steps=(1, 2), vocab=None, config=None):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config or Config())))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                               for s in steps))
    if vocab is not None:
        (out / "vocab.json").write_text(json.dumps({"chars": vocab}))
    for step in steps:
        save_checkpoint(out / rundir.CHECKPOINTS, step, TREE)
    return out


def test_a_fresh_directory_is_a_fresh_run(tmp_path):
    out = tmp_path / "new"
    assert rundir.plan(out, Config(), None, LIKE, 10, resume=False, overwrite=False) == \
        rundir.Plan(None, [], False, [])
    assert not out.exists()  # plan only reads
    resumed = rundir.plan(out, Config(), None, LIKE, 10, resume=True, overwrite=False)
    assert resumed.resume_step is None
    assert resumed.notes == [f"no checkpoint in {out / 'checkpoints'}: starting a fresh run"]


def test_an_existing_run_is_refused_without_a_flag(tmp_path):
    out = _run(tmp_path)
    before = _snapshot(out)
    with pytest.raises(ConfigError) as info:
        rundir.plan(out, Config(), None, LIKE, 10, resume=False, overwrite=False)
    assert str(info.value) == (f"output_dir {out} already holds a run (config.yaml, "
                               f"metrics.jsonl, checkpoints/): pass --resume to continue it or "
                               f"--overwrite to start it again")
    assert _snapshot(out) == before


def test_overwrite_clears_only_in_prepare(tmp_path):
    out = _run(tmp_path)
    (out / "notes.txt").write_text("the user's own file")
    before = _snapshot(out)
    run_plan = rundir.plan(out, Config(), None, LIKE, 10, resume=False, overwrite=True)
    assert run_plan.clear and run_plan.resume_step is None
    assert _snapshot(out) == before
    rundir.prepare(out, Config(), None, run_plan)
    assert sorted(_snapshot(out)) == ["config.yaml", "metrics.jsonl", "notes.txt"]
    assert (out / "metrics.jsonl").read_text() == ""
    assert not (out / "checkpoints").exists()


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match="--resume and --overwrite exclude each other"):
        rundir.plan(tmp_path, Config(), None, LIKE, 10, resume=True, overwrite=True)


def test_a_file_is_not_a_run_directory(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir .*f is a file, not a directory"):
        rundir.plan(tmp_path / "f", Config(), None, LIKE, 10, resume=False, overwrite=False)


def test_resume_keeps_metrics_up_to_the_checkpoint(tmp_path):
    out = _run(tmp_path, steps=(1, 2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.1}) + "\n" + '{"step": 4, "lo')  # killed
    run_plan = rundir.plan(out, Config(epochs=3), None, LIKE, 10, resume=True, overwrite=False)
    assert run_plan == rundir.Plan(2, [], False, ["resuming from step 2"])
    rundir.prepare(out, Config(epochs=3), None, run_plan)
    assert [json.loads(line)["step"] for line in
            (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 3


def test_resume_refuses_another_config(tmp_path):
    out = _run(tmp_path)
    before = _snapshot(out)
    changed = Config(model={"name": "mlp", "hidden_features": [8]}, seed=1, epochs=5)
    with pytest.raises(ConfigError) as info:
        rundir.plan(out, changed, None, LIKE, 10, resume=True, overwrite=False)
    message = str(info.value)
    assert message.startswith(f"cannot resume the run in {out} with another config (model: the "
                              f"run's {{'name': 'mlp'}}, now {{'name': 'mlp', 'hidden_features': "
                              f"[8]}}; seed: the run's 0, now 1); only ")
    assert "epochs" in message.split("only ")[1]
    assert "\n" not in message
    assert _snapshot(out) == before


def test_resume_refuses_another_vocabulary_of_the_same_size(tmp_path):
    out = _run(tmp_path, vocab="abc")
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"the data's vocabulary \(3 characters\) is not the "
                                          r"run's \(3 characters in vocab.json\)"):
        rundir.plan(out, Config(), SimpleNamespace(chars="abd"), LIKE, 10, resume=True,
                    overwrite=False)
    with pytest.raises(ConfigError, match="it has a vocab.json but the data has no vocabulary"):
        rundir.plan(out, Config(), None, LIKE, 10, resume=True, overwrite=False)
    assert _snapshot(out) == before
    assert rundir.plan(out, Config(), SimpleNamespace(chars="abc"), LIKE, 10, resume=True,
                       overwrite=False).resume_step == 2


def test_a_corrupt_latest_checkpoint_is_set_aside_in_prepare(tmp_path):
    out = _run(tmp_path, steps=(1, 2))
    data = next((out / "checkpoints" / "step_00000002").glob("*.bin"))
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    before = _snapshot(out)
    run_plan = rundir.plan(out, Config(), None, LIKE, 10, resume=True, overwrite=False)
    assert run_plan.resume_step == 1
    assert [step for step, _ in run_plan.corrupt] == [2]
    assert run_plan.notes[0].startswith("the checkpoint of step 2 is corrupt (")
    assert run_plan.notes[0].endswith(f"resuming from step 1; the corrupt one is kept aside in "
                                      f"{out / 'checkpoints'}")
    assert _snapshot(out) == before
    rundir.prepare(out, Config(), None, run_plan)
    assert list_steps(out / "checkpoints") == [1]
    aside = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("corrupt-")]
    assert len(aside) == 1 and aside[0].startswith("corrupt-step_00000002-")


def test_resume_refuses_a_checkpoint_past_the_run(tmp_path):
    out = _run(tmp_path, steps=(1, 12))
    with pytest.raises(ConfigError, match=r"its checkpoint is at step 12, past this run's 10 "
                                          r"steps \(epochs 2\); give more epochs"):
        rundir.plan(out, Config(), None, LIKE, 10, resume=True, overwrite=False)


def test_resume_refuses_a_checkpoint_of_another_structure(tmp_path):
    out = _run(tmp_path)
    other = jax.eval_shape(lambda: {"w": jnp.zeros((3, 3)), "step": jnp.array(0)})
    with pytest.raises(ConfigError, match=f"^cannot resume the run in {out}: no checkpoint in "):
        rundir.plan(out, Config(), None, other, 10, resume=True, overwrite=False)


def test_a_run_without_its_config_or_with_a_broken_one(tmp_path):
    out = _run(tmp_path)
    (out / "config.yaml").write_text("model: [unclosed\n  x: 1")
    with pytest.raises(ConfigError) as info:
        rundir.plan(out, Config(), None, LIKE, 10, resume=True, overwrite=False)
    assert "its config.yaml does not read" in str(info.value) and "\n" not in str(info.value)
    (out / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="it has no config.yaml"):
        rundir.plan(out, Config(), None, LIKE, 10, resume=True, overwrite=False)


def test_read_vocab(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"chars": "ab\n"}))
    assert rundir.read_vocab(path) == "ab\n"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"vocab.json is not a vocabulary of fnn's \(expected "
                                          r"\{\"chars\": \.\.\.\}\)"):
        rundir.read_vocab(path)


def test_a_run_of_0_1_resumes_with_the_weight_decay_it_had(tmp_path):
    """Its config.yaml has no weight_decay_mask: adamw decayed every parameter then."""
    from fnn.app.config import parse_config

    raw = yaml.safe_load((ROOT / "configs" / "digits_mlp.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "run")
    config = parse_config(raw)
    assert config.optimizer["weight_decay_mask"] == "weights"  # written out from now on
    written = dataclasses.asdict(config)
    written["optimizer"] = {k: v for k, v in written["optimizer"].items()
                            if k != "weight_decay_mask"}
    for key in ("init", "augment", "mix"):
        del written[key]
    out = _run(tmp_path, config=None)
    (out / "config.yaml").write_text(yaml.safe_dump(written))
    with pytest.raises(ConfigError, match=r"optimizer: the run's .*'weight_decay_mask': 'all'"):
        rundir.plan(out, config, None, LIKE, 10, resume=True, overwrite=False)
    raw["optimizer"]["weight_decay_mask"] = "all"
    assert rundir.plan(out, parse_config(raw), None, LIKE, 10, resume=True,
                       overwrite=False).resume_step == 2
