"""Short versions of configs/digits_gan.yaml and configs/digits_ddpm.yaml, judged as the README's
numbers are (benchmarks/sample_quality.py: a LeNet trained on the digits, the Fréchet distance
of its features, the classes it sees): training must move every measure the right way."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from fnn import quality
from fnn.app import load_run
from fnn.app.cli import main
from fnn.data import load_digits

ROOT = Path(__file__).resolve().parents[1]
NUM = 300  # samples judged per model


@pytest.fixture(scope="module")
def judge():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sample_quality  # benchmarks/sample_quality.py: the README's judge
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    data = load_digits()
    j, report, _ = sample_quality.train_judge(data, epochs=40, seed=0)
    assert report["accuracy"] > 0.99
    return j, data


def _train(tmp_path, name, epochs, **model):
    raw = yaml.safe_load((ROOT / "configs" / f"digits_{name}.yaml").read_text())
    raw["model"] |= model
    raw |= {"epochs": epochs, "eval_every": epochs, "output_dir": str(tmp_path / name)}
    if name == "ddpm":
        raw["schedule"] = {"name": "cosine", "warmup_steps": 20}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["train", str(path), "--no-progress"])
    assert code == 0
    return load_run(tmp_path / name)


def _report(j, data, run, ts, **options):
    samples = run.learner.sample(ts, jax.random.key(7), NUM, **options)
    return quality.sample_report(j, np.asarray(samples), labels=options.get("labels"),
                                 reference=data.x_test)


def _untrained(run):
    """The run's networks at their initialisation, before any step."""
    return run.learner.init(jax.random.key(run.config.seed),
                            jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32))


def test_a_short_gan_run_moves_the_samples_towards_the_digits(tmp_path, judge):
    j, data = judge
    run = _train(tmp_path, "gan", 25)
    before = _report(j, data, run, _untrained(run))
    after = _report(j, data, run, run.train_state)
    noise = quality.frechet_baselines(j, data.x_test, data.x_train, num=NUM)["noise"]
    assert after["frechet"] < 0.5 * before["frechet"]
    assert after["frechet"] < noise
    assert after["min_class_fraction"] > before["min_class_fraction"]
    assert after["mean_confidence"] > before["mean_confidence"]


def test_a_short_conditional_diffusion_run_draws_the_requested_classes(tmp_path, judge):
    j, data = judge
    run = _train(tmp_path, "ddpm", 20)
    labels = np.arange(NUM) % 10
    options = {"labels": labels, "steps": 10, "guidance": 2.0}
    before = _report(j, data, run, _untrained(run), **options)
    after = _report(j, data, run, run.train_state, **options)
    assert before["accuracy"] < 0.25  # chance is 0.1
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert after["frechet"] < 0.5 * before["frechet"]
    stronger = _report(j, data, run, run.train_state, **options | {"guidance": 4.0})
    unguided = _report(j, data, run, run.train_state, **options | {"guidance": 0.0})
    assert stronger["accuracy"] > unguided["accuracy"]
