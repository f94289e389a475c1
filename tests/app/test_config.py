"""Configs: keys and values checked strictly (types as the functions declare them, ranges that
can be meant, the model built, seq_len against max_length), YAML numbers as users write them."""

from pathlib import Path

import pytest
import yaml

from fnn.app.config import ConfigError, load_config, parse_config
from fnn.app.values import load_yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _raw(name="digits_mlp.yaml"):
    return yaml.safe_load((ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.epochs > 0


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(epoch=3), r"unknown key 'epoch' in the config; did you mean 'epochs'\?"),
    (lambda c: c["model"].update(hiden_features=[3]),
     r"unknown key 'hiden_features' in model \(mlp\); did you mean 'hidden_features'\?"),
    (lambda c: c["optimizer"].update(learning_rat=0.1),
     r"unknown key 'learning_rat' in optimizer \(adamw\); did you mean 'learning_rate'\?"),
    (lambda c: c["optimizer"].update(name="adamm"),
     r"unknown key 'adamm' in optimizer.name; did you mean 'adam'\?"),
    (lambda c: c["schedule"].update(warmup=3),
     r"unknown key 'warmup' in schedule \(cosine\); did you mean 'warmup_steps'\?"),
    (lambda c: c["data"].update(batchsize=3), r"unknown key 'batchsize' in data \(digits\)"),
    (lambda c: c["loss"].update(smoothing=0.1), r"unknown key 'smoothing' in loss"),
    (lambda c: c["model"].pop("hidden_features"), r"model \(mlp\) is missing hidden_features"),
    (lambda c: c.pop("seed"), r"the config is missing seed"),
    (lambda c: c.update(epochs="ten"), r"epochs must be int, got 'ten'"),
    (lambda c: c["data"].update(batch_size=0), r"data.batch_size must be a positive int"),
])
def test_bad_configs_are_rejected_with_a_clear_message(edit, message):
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(parallel="pmapp"), r"unknown key 'pmapp' in parallel.mode; did you mean"),
    (lambda c: c.update(parallel={"mode": "pmap", "device": 2}),
     r"unknown key 'device' in parallel; did you mean 'devices'\?"),
    (lambda c: c.update(parallel={"devices": 0}), r"parallel.devices must be a positive int"),
    (lambda c: c.update(precision="bf16"), r"unknown key 'bf16' in precision"),
    (lambda c: c.update(checkpoint={"every": 5, "kept": 2}),
     r"unknown key 'kept' in checkpoint; did you mean 'keep'\?"),
    (lambda c: c.update(max_bad_steps=0), r"max_bad_steps must be positive"),
    (lambda c: c.update(host_malloc="fast"), r"unknown key 'fast' in host_malloc"),
    (lambda c: c.update(model={"name": "gpt"}),
     r"model gpt trains on data 'text', got data 'digits'"),
    (lambda c: c.update(data={"name": "arrays", "batch_size": 8}),
     r"data \(arrays\) is missing path"),
    (lambda c: c.update(data={"name": "csv", "batch_size": 8, "path": "a.csv"}),
     r"data \(csv\) is missing label_column"),
    (lambda c: c.update(data={"name": "arrays", "batch_size": 8, "path": "a.npz",
                              "test_path": "b.npz", "test_fraction": 0.2}),
     r"data: give test_path .* or test_fraction .*, not both"),
    (lambda c: c.update(data={"name": "arrays", "batch_size": 8, "path": "a.npz",
                              "test_fraction": 1.0}),
     r"data \(arrays\): test_fraction must be in \(0, 1\), got 1.0"),
    (lambda c: c.update(data={"name": "images", "batch_size": 8, "path": "d", "size": [8]}),
     r"data \(images\): size must be a positive int or \[height, width\], got \[8\]"),
    (lambda c: c.update(data={"name": "images", "batch_size": 8, "path": "d", "size": 8,
                              "channels": 2}),
     r"data \(images\): channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"),
    (lambda c: c.update(data={"name": "csv", "batch_size": 8, "path": "a.csv",
                              "label_column": 1.5}),
     r"data \(csv\): label_column must be a column name or index, got 1.5"),
    (lambda c: c.update(data={"name": "text_classes", "batch_size": 8, "path": "d",
                              "seq_len": 8}),
     r"model mlp trains on data 'digits' or 'images' or 'arrays' or 'csv', got data "
     r"'text_classes'"),
    (lambda c: c.update(augment={"name": "random_crop"}), r"augment must be a list of mappings"),
    (lambda c: c.update(augment=[{"name": "random_rotate"}]),
     r"unknown key 'random_rotate' in augment.name"),
    (lambda c: c.update(augment=[{"name": "random_crop", "pad": 1}]),
     r"unknown key 'pad' in augment\[0\] \(random_crop\)"),
    (lambda c: c.update(augment=[{"name": "gaussian_noise", "stddev": "x"}]),
     r"augment\[0\] \(gaussian_noise\): stddev must be a finite number, got 'x' \(a string\)"),
    (lambda c: c.update(augment=[{"name": "cutout", "size": 2, "p": 2.0}]),
     r"augment\[0\] \(cutout\): Cutout: p must be"),
])
def test_bad_optional_sections_are_rejected(edit, message):
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_optional_sections_take_defaults_and_shorthands():
    config = parse_config(_raw() | {"parallel": "sharded"})
    assert config.parallel == {"mode": "sharded", "devices": None, "mesh": None, "rules": None}
    assert config.precision == "float32" and config.max_bad_steps == 10
    assert config.host_malloc == "default"
    assert config.checkpoint == {"every": None, "keep": 3}
    lm = _raw("charlm_lstm.yaml")
    lm["model"]["vocab_size"] = 50
    with pytest.raises(ConfigError, match="vocab_size comes from the data; remove it"):
        parse_config(lm)
    lm = _raw("charlm_lstm.yaml")
    lm["data"].pop("seq_len")
    with pytest.raises(ConfigError, match=r"data \(text\) is missing seq_len"):
        parse_config(lm)


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads 1e-3 as a string (YAML 1.1); users write it, so it is a number here
    assert load_yaml("a: 1e-3\nb: 1E5\nc: -2.5e-4\nd: 1e3x\ne: 3\n") == {
        "a": 0.001, "b": 100000.0, "c": -0.00025, "d": "1e3x", "e": 3}
    text = (ROOT / "configs" / "digits_mlp.yaml").read_text()
    text = text.replace("learning_rate: 0.002", "learning_rate: 1e-3")
    text = text.replace("weight_decay: 0.0001", "weight_decay: 1e-4")
    text = text.replace("label_smoothing: 0.1", "label_smoothing: 1e-1")
    (tmp_path / "c.yaml").write_text(text)
    config = load_config(tmp_path / "c.yaml")
    assert config.optimizer["learning_rate"] == 0.001
    assert config.optimizer["weight_decay"] == 0.0001
    assert config.loss["label_smoothing"] == 0.1


@pytest.mark.parametrize("section, key, value, message", [
    ("optimizer", "learning_rate", "1e-3x",
     r"^optimizer \(adamw\): learning_rate must be a finite number, got '1e-3x' \(a string\)$"),
    ("optimizer", "learning_rate", -0.1,
     r"^optimizer \(adamw\): learning_rate must be a positive number, got -0.1$"),
    ("optimizer", "learning_rate", 0, r"learning_rate must be a positive number, got 0$"),
    ("optimizer", "weight_decay", -1e-4, r"weight_decay must be a number >= 0, got -0.0001$"),
    ("optimizer", "b1", 1.5, r"b1 must be a number in \[0, 1\), got 1.5$"),
    ("optimizer", "nesterov", "yes", r"nesterov must be true or false, got 'yes'"),
    ("schedule", "warmup_steps", -5, r"^schedule \(cosine\): warmup_steps must be an int >= 0"),
    ("schedule", "warmup_steps", 2.5, r"warmup_steps must be an int, got 2.5 \(a number\)$"),
    ("loss", "label_smoothing", 1.0, r"^loss \(softmax_cross_entropy\): label_smoothing must "
                                     r"be a number in \[0, 1\), got 1.0$"),
    ("model", "dropout", 2.0, r"^model \(mlp\): dropout must be a drop probability in \[0, 1\), "
                              r"got 2.0$"),
    ("model", "hidden_features", [-5], r"^model \(mlp\): MLP: hidden_features must be a "
                                       r"positive integer or a tuple of them, got \(-5,\)$"),
    ("model", "hidden_features", 64, r"^model \(mlp\): hidden_features must be a list of ints, "
                                     r"got 64 \(an int\)$"),
    ("model", "activation", "relu7", r"^model \(mlp\): unknown activation 'relu7'"),
    ("model", "out_features", "ten", r"out_features must be an int, got 'ten' \(a string\)$"),
])
def test_values_of_the_wrong_type_or_range_name_the_key(section, key, value, message):
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_the_learning_rate_is_required_and_checked_for_every_optimizer():
    raw = _raw()
    raw["optimizer"] = {"name": "adafactor"}
    with pytest.raises(ConfigError, match=r"optimizer \(adafactor\) is missing learning_rate"):
        parse_config(raw)


def test_seq_len_must_fit_the_models_max_length():
    raw = _raw("charlm_transformer.yaml")
    raw["data"]["seq_len"] = 200  # max_length is 128
    with pytest.raises(ConfigError, match=r"^data.seq_len \(200\) must be at most the model's "
                                          r"max_length \(128\)"):
        parse_config(raw)
    raw["model"]["max_length"] = 256
    assert parse_config(raw).data["seq_len"] == 200
    raw = _raw("charlm_transformer.yaml")
    raw["model"].pop("max_length")  # the factory's default, 128, counts too
    raw["data"]["seq_len"] = 129
    with pytest.raises(ConfigError, match=r"max_length \(128\)"):
        parse_config(raw)


def test_a_config_file_that_is_not_a_file_or_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory, not a config file"):
        load_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: "):
        load_config(tmp_path / "bad.yaml")


def test_an_override_of_one_key_of_a_section_keeps_the_others(tmp_path):
    raw = _raw() | {"parallel": {"mode": "pmap"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "c.yaml", {"parallel": {"devices": 4}})
    # --devices does not drop pmap
    assert config.parallel == {"mode": "pmap", "devices": 4, "mesh": None, "rules": None}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_raw() | {"parallel": "sharded"}))
    assert load_config(tmp_path / "s.yaml", {"parallel": {"devices": 2}}).parallel == {
        "mode": "sharded", "devices": 2, "mesh": None, "rules": None}
    with pytest.raises(ConfigError, match=r"parallel.devices is 4 but parallel.mode is none "
                                          r"\(one device\): give a mode"):
        load_config(tmp_path / "s.yaml", {"parallel": {"mode": "none", "devices": 4}})


@pytest.mark.parametrize("parallel, message", [
    ({"mode": "sharded", "mesh": {"data": 8}}, "parallel.mesh is for the modes fsdp and tensor"),
    ({"mode": "tensor", "mesh": {"model": 8}}, "parallel.mesh needs a data axis"),
    ({"mode": "tensor", "mesh": {"data": 0}}, "parallel.mesh.data must be a positive int"),
    ({"mode": "fsdp", "rules": ["x"]}, "parallel.rules must map parameter patterns"),
    ({"mode": "fsdp", "rules": {"head/w": "model"}},
     r"parallel.rules.head/w must be a list of mesh axis names or null"),
])
def test_the_layout_of_fsdp_and_tensor_is_checked(parallel, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_raw() | {"parallel": parallel})
    tensor = parse_config(_raw() | {"parallel": {"mode": "tensor", "mesh": {"data": 2,
                                                                              "model": 4}}})
    assert tensor.parallel["mesh"] == {"data": 2, "model": 4}


def test_the_number_of_classes_may_come_from_the_data():
    raw = _raw()
    del raw["model"]["out_features"]
    assert "out_features" not in parse_config(raw).model
    raw = _raw("charlm_lstm.yaml")
    raw["model"]["vocab_size"] = 3
    with pytest.raises(ConfigError, match=r"vocab_size comes from the data; remove it"):
        parse_config(raw)
