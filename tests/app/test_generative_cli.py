"""GAN and diffusion runs from the command line: ``fnn train`` on configs/digits_gan.yaml and
configs/digits_ddpm.yaml (shortened and shrunk), the grids of samples, ``fnn sample``, a
SIGKILL and ``--resume`` ending bit-identical, and the config's checks of the gan and
diffusion sections."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fnn.app.cli import main
from fnn.app.config import ConfigError, parse_config
from helpers import kill_at_first_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _raw(name):
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def _small(tmp_path, kind, **changes):
    """The config of ``kind`` (gan, ddpm), small enough for a test: one or two epochs of
    small networks."""
    raw = _raw(f"digits_{kind}.yaml")
    if kind == "gan":
        raw["model"] |= {"features": 8, "latent_features": 8}
        raw["gan"]["discriminator"] |= {"features": 8}
        raw |= {"epochs": 2, "eval_every": 1}
    else:
        raw["model"] |= {"features": 8, "multipliers": [1], "num_heads": 1}
        raw["diffusion"] |= {"timesteps": 20, "sample_steps": 5}
        raw["schedule"] = {"name": "constant"}
        raw |= {"epochs": 1, "eval_every": 1}
    raw |= {"output_dir": str(tmp_path / kind)} | changes
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fnn(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fnn.app.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _main(argv):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_the_shipped_configs_parse():
    for name in ("digits_gan.yaml", "digits_ddpm.yaml"):
        config = parse_config(_raw(name))
        assert config.loss is None
    assert parse_config(_raw("digits_gan.yaml")).gan["loss"] == "hinge"
    assert parse_config(_raw("digits_ddpm.yaml")).diffusion["guidance"] == 2.0


def test_a_gan_run_writes_grids_and_fnn_sample_draws_more(tmp_path):
    config = _small(tmp_path, "gan")
    code, out, err = _main(["train", config, "--no-progress"])
    assert code == 0, err
    run = tmp_path / "gan"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [22, 44]
    assert {"train_d_loss", "train_g_loss", "train_d_real", "test_d_fake"} <= set(rows[-1])
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step_00000022.png", "step_00000044.png"]
    assert (run / "samples" / grids[0]).read_bytes()[:4] == b"\x89PNG"
    assert "samples in" in out and "fnn sample" in out
    assert json.loads((run / "inputs.json").read_text())["data_range"] == [0.0, 1.0]

    code, out, err = _main(["sample", run, "--num", "7", "--out", tmp_path / "s.npz"])
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f) == ["samples"]
        samples = f["samples"]
    assert samples.shape == (7, 8, 8, 1) and samples.dtype == np.float32
    assert 0 <= samples.min() and samples.max() <= 1
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = _main(["sample", run, "--num", "7", "--out", tmp_path / "s.npz", "--seed",
                          "0", "--overwrite"])
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as f:
        np.testing.assert_array_equal(f["samples"], samples)  # the seed decides
    code, _, err = _main(["sample", run, "--num", "7", "--out", tmp_path / "other.npz",
                          "--seed", "1"])
    assert code == 0, err
    with np.load(tmp_path / "other.npz") as f:
        assert not np.allclose(f["samples"], samples)

    for argv, message in (
            (["--label", "3"], "--label is for a diffusion run"),
            (["--steps", "5"], "--steps is for a diffusion run"),
            ([], f"{tmp_path / 's.npz'} exists: pass --overwrite"),
            (["--num", "0", "--overwrite"], "--num must be at least 1, got 0")):
        code, _, err = _main(["sample", run, "--out", tmp_path / "s.npz", *argv])
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = _main(["sample", run, "--out", tmp_path / "s.png"])
    assert code == 2 and "--out must name an .npz file" in err


def test_a_conditional_diffusion_run_samples_the_requested_class(tmp_path):
    config = _small(tmp_path, "ddpm")
    code, out, err = _main(["train", config, "--no-progress"])
    assert code == 0, err
    run = tmp_path / "ddpm"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000022.png"]
    code, out, err = _main(["sample", run, "--num", "6", "--label", "4", "--steps", "all",
                            "--guidance", "3", "--out", tmp_path / "fours.npz"])
    assert code == 0, err
    assert "ancestral sampling, guidance 3.0" in out
    with np.load(tmp_path / "fours.npz") as f:
        assert f["samples"].shape == (6, 8, 8, 1)
        np.testing.assert_array_equal(f["labels"], np.full(6, 4))
    code, out, err = _main(["sample", run, "--num", "12", "--out", tmp_path / "all.npz"])
    assert code == 0 and "5 DDIM steps, guidance 2.0" in out
    with np.load(tmp_path / "all.npz") as f:
        np.testing.assert_array_equal(f["labels"], np.arange(12) % 10)
    for argv, message in (
            (["--label", "10"], "--label must be a class in [0, 10), got 10"),
            (["--steps", "21"], "--steps must be 'all' or a number of DDIM steps in [1, 20]"),
            (["--guidance", "-1"], "--guidance must be a number >= 0, got -1.0")):
        code, _, err = _main(["sample", run, "--out", tmp_path / "x.npz", *argv])
        assert code == 2 and message in err, err
    assert not (tmp_path / "x.npz").exists()


def test_fnn_sample_refuses_a_classifier_run(tmp_path):
    raw = _raw("digits_mlp.yaml") | {"epochs": 1, "output_dir": str(tmp_path / "mlp")}
    raw["model"] |= {"hidden_features": [8]}
    raw["schedule"] = {"name": "constant"}
    (tmp_path / "mlp.yaml").write_text(yaml.safe_dump(raw))
    assert _main(["train", tmp_path / "mlp.yaml", "--no-progress"])[0] == 0
    code, _, err = _main(["sample", tmp_path / "mlp", "--out", tmp_path / "x.npz"])
    assert code == 2 and "fnn sample needs a gan or diffusion run, this one trained mlp" in err


def _last_checkpoint(run):
    manifest = max((run / "checkpoints").glob("step_*")) / "manifest.json"
    return {entry["path"]: entry["sha256"] for entry in json.loads(manifest.read_text())["arrays"]}


@pytest.mark.parametrize("kind", ["gan", "ddpm"])
def test_a_generative_run_killed_with_sigkill_and_resumed_ends_bit_identical(tmp_path, kind):
    config = _small(tmp_path, kind, epochs=3, checkpoint={"every": 5, "keep": 2})
    alone = _fnn("train", config, "--output-dir", tmp_path / "alone", "--no-progress")
    assert alone.returncode == 0, alone.stderr
    run = tmp_path / "killed"
    assert kill_at_first_checkpoint(config, run) < 3 * 22  # killed before the end
    resumed = _fnn("train", config, "--output-dir", run, "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _last_checkpoint(run) == _last_checkpoint(tmp_path / "alone")
    paths = set(_last_checkpoint(run))
    assert any(p.startswith(".ema") for p in paths) == (kind == "ddpm")
    assert any("discriminator" in p for p in paths) == (kind == "gan")
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa
                          for line in path.read_text().splitlines()]
    assert strip(run / "metrics.jsonl") == strip(tmp_path / "alone" / "metrics.jsonl")
    for grid in (tmp_path / "alone" / "samples").iterdir():  # the same pictures
        assert (run / "samples" / grid.name).read_bytes() == grid.read_bytes()


@pytest.mark.parametrize("change, message", [
    (lambda r: r | {"loss": {"name": "mean_squared_error"}},
     "loss: not for a gan run (the gan section gives the objective); remove it"),
    (lambda r: {k: v for k, v in r.items() if k != "gan"},
     "model dcgan_generator is trained as a gan: add a gan section"),
    (lambda r: r | {"diffusion": {}},
     "give gan or diffusion, not both"),
    (lambda r: r | {"gan": {"loss": "hinge"}}, "gan is missing discriminator"),
    (lambda r: r | {"gan": r["gan"] | {"loss": "wasserstein"}},
     "unknown key 'wasserstein' in gan.loss"),
    (lambda r: r | {"gan": r["gan"] | {"discriminator": {"name": "dcgan_discriminator",
                                                         "image_size": 8}}},
     "gan.discriminator (dcgan_discriminator): image_size comes from the data; remove it"),
    (lambda r: r | {"gan": r["gan"] | {"discriminator": {"name": "dcgan_discriminator",
                                                         "feature": 8}}},
     "unknown key 'feature' in gan.discriminator (dcgan_discriminator); did you mean "
     "'features'?"),
    (lambda r: r | {"gan": r["gan"] | {"optimizer": {"name": "adam"}}},
     "gan: optimizer (adam) is missing learning_rate"),
    (lambda r: r | {"mix": {"name": "mixup", "alpha": 0.2}},
     "mix: not for a gan run"),
])
def test_gan_config_errors(change, message):
    with pytest.raises(ConfigError) as e:
        parse_config(change(_raw("digits_gan.yaml")))
    assert message in str(e.value)


@pytest.mark.parametrize("change, message", [
    (lambda r: r | {"diffusion": r["diffusion"] | {"timesteps": 1}},
     "diffusion.timesteps must be an int >= 2, got 1"),
    (lambda r: r | {"diffusion": r["diffusion"] | {"sample_steps": 2000}},
     "diffusion.sample_steps (2000) must be at most the timesteps (1000)"),
    (lambda r: r | {"diffusion": r["diffusion"] | {"noise_schedule": "cosin"}},
     "unknown key 'cosin' in diffusion.noise_schedule; did you mean 'cosine'?"),
    (lambda r: r | {"diffusion": r["diffusion"] | {"ema_decay": 1.0}},
     "diffusion.ema_decay must be in [0, 1), got 1.0"),
    (lambda r: r | {"diffusion": r["diffusion"] | {"guidence": 1.0}},
     "unknown key 'guidence' in diffusion; did you mean 'guidance'?"),
    (lambda r: r | {"model": {"name": "lenet"}},
     "a diffusion section needs a model made for it (unet), got model lenet"),
    (lambda r: r | {"model": r["model"] | {"channels": 3}},
     "model (unet): channels comes from the data; remove it"),
    (lambda r: r | {"eval_every": 0}, "eval_every must be positive, got 0"),
    (lambda r: r | {"model": {"name": "unet"}, "diffusion": r["diffusion"] | {"guidance": 3.0}},
     "diffusion.guidance is for a class-conditional model (give model.num_classes)"),
    (lambda r: r | {"diffusion": r["diffusion"] | {"noise_schedule": "linear", "timesteps": 10,
                                                   "sample_steps": 5}},
     "diffusion: timesteps 10 with the linear schedule: linear_schedule: expected 0 < "
     "beta_start <= beta_end < 1"),
    (lambda r: r | {"optimizer": r["optimizer"] | {"frozen": ["stem/**"]}},
     "optimizer (adam): frozen is for a classifier's parameters, not a diffusion run's"),
])
def test_diffusion_config_errors(change, message):
    with pytest.raises(ConfigError) as e:
        parse_config(change(_raw("digits_ddpm.yaml")))
    assert message in str(e.value)


def test_diffusion_defaults_follow_the_model():
    raw = _raw("digits_ddpm.yaml")
    raw["diffusion"] = {"timesteps": 20}
    assert parse_config(raw).diffusion["sample_steps"] == 20  # as many as there are
    raw["model"] = {k: v for k, v in raw["model"].items() if k != "num_classes"}
    unconditional = parse_config(raw).diffusion
    assert unconditional["guidance"] == 1.0 and unconditional["label_dropout"] == 0.0


def test_a_classifier_config_still_needs_its_loss():
    raw = _raw("digits_mlp.yaml")
    del raw["loss"]
    with pytest.raises(ConfigError, match="the config is missing loss"):
        parse_config(raw)


def test_a_conditional_model_needs_a_label_for_every_class(tmp_path):
    config = _small(tmp_path, "ddpm")
    raw = yaml.safe_load(config.read_text())
    raw["model"]["num_classes"] = 5
    config.write_text(yaml.safe_dump(raw))
    code, _, err = _main(["train", config, "--no-progress"])
    assert code == 2
    assert "model (unet): diffusion: num_classes is 5 but the task's labels go up to 9: give " \
        "num_classes=10" in err
    assert not (tmp_path / "ddpm").exists()  # nothing written
