"""`fnn train` on users' own files, written by the tests: an npz, a CSV, a folder of PNG and
JPEG images per class and a folder of .txt files per class; the model's classes come from the
data, bad files are one-line errors that write nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fnn.app import load_run
from fnn.app.cli import main
from fnn.data import load_digits

ROOT = Path(__file__).parents[2]


def _config(tmp_path, data, model, name="run", **more):
    raw = {"model": model, "data": data,
           "optimizer": {"name": "adam", "learning_rate": 0.005},
           "schedule": {"name": "constant"}, "loss": {"name": "softmax_cross_entropy"},
           "epochs": 4, "seed": 0, "output_dir": str(tmp_path / name)} | more
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(path, capsys):
    code = main(["train", str(path), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured


def _accuracy(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["test_accuracy"]


def test_npz_arrays_with_a_test_file(tmp_path, capsys):
    digits = load_digits()
    np.savez(tmp_path / "train.npz", x=digits.x_train[:400], y=digits.y_train[:400])
    np.savez(tmp_path / "test.npz", x=digits.x_test, y=digits.y_test)
    path = _config(tmp_path, {"name": "arrays", "batch_size": 32, "path": str(tmp_path /
                                                                            "train.npz"),
                              "test_path": str(tmp_path / "test.npz")},
                   {"name": "mlp", "hidden_features": [64], "flatten_axes": 3})
    code, captured = _train(path, capsys)
    assert code == 0, captured.err
    run = load_run(tmp_path / "run")
    assert run.params["head"]["w"].shape == (64, 10)  # out_features from the data's 10 classes
    assert _accuracy(tmp_path / "run") > 0.8
    # the run is rebuilt from its own files (inputs.json), without its data
    (tmp_path / "train.npz").unlink()
    again = load_run(tmp_path / "run")
    assert np.asarray(again.params["head"]["w"]).tobytes() == \
        np.asarray(run.params["head"]["w"]).tobytes()


def test_csv_rows_with_a_fixed_split(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + 2 * (x[:, 2] > 0.5)  # 4 classes
    lines = ["a,b,c,d,label"] + [",".join(f"{v:.5f}" for v in row) + f",{c}"
                                 for row, c in zip(x, y)]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    path = _config(tmp_path, {"name": "csv", "batch_size": 16, "path": str(tmp_path / "rows.csv"),
                              "label_column": "label"},
                   {"name": "mlp", "hidden_features": [32]}, epochs=10)
    code, captured = _train(path, capsys)
    assert code == 0, captured.err
    assert load_run(tmp_path / "run").params["head"]["w"].shape == (32, 4)
    assert _accuracy(tmp_path / "run") > 0.8
    # a row with a missing column: one line naming the file and the line, nothing written
    (tmp_path / "rows.csv").write_text("\n".join(lines[:10] + ["1,2,3,0"] + lines[10:]) + "\n")
    path = _config(tmp_path, {"name": "csv", "batch_size": 16, "path": str(tmp_path / "rows.csv"),
                              "label_column": "label"},
                   {"name": "mlp", "hidden_features": [32]}, name="bad")
    code, captured = _train(path, capsys)
    assert code == 2 and len(captured.err.splitlines()) == 1
    assert "rows.csv" in captured.err and "line 11" in captured.err
    assert not (tmp_path / "bad").exists()


def _image_folder(root, per_class=12, seed=0):
    """Three classes of 12x10 images a CNN can tell apart: bright left half, bright top half,
    bright centre, with noise; PNG for two classes, JPEG for the third."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, region, suffix in (("left", np.s_[:, :5], ".png"), ("top", np.s_[:6, :], ".png"),
                                 ("centre", np.s_[3:9, 2:8], ".jpg")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.uniform(0, 60, (12, 10, 3))
            pixels[region] += 180
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}{suffix}")


def test_a_folder_of_images_per_class_with_augmentation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FNN_CACHE_DIR", str(tmp_path / "cache"))
    _image_folder(tmp_path / "images")
    path = _config(tmp_path, {"name": "images", "batch_size": 8, "path": str(tmp_path / "images"),
                              "size": [8, 8], "test_fraction": 0.25},
                   {"name": "lenet", "features": [8, 16], "kernel_size": 3,
                    "hidden_features": 16}, epochs=15,
                   augment=[{"name": "random_flip"}, {"name": "gaussian_noise", "stddev": 0.05}])
    code, captured = _train(path, capsys)
    assert code == 0, captured.err
    run = load_run(tmp_path / "run")
    assert run.params["head"]["w"].shape == (16, 3)
    assert _accuracy(tmp_path / "run") >= 0.75
    assert list((tmp_path / "cache").iterdir())  # decoded once, cached
    # an unreadable image: one line naming it, nothing written
    (tmp_path / "images" / "top" / "broken.png").write_bytes(b"not a png")
    path = _config(tmp_path, {"name": "images", "batch_size": 8, "path": str(tmp_path / "images"),
                              "size": 8}, {"name": "lenet"}, name="bad")
    code, captured = _train(path, capsys)
    assert code == 2 and len(captured.err.splitlines()) == 1 and "broken.png" in captured.err
    assert not (tmp_path / "bad").exists()


def test_a_folder_of_texts_per_class(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = {"fruit": ["apple", "pear", "plum", "fig"], "tool": ["saw", "drill", "hammer", "axe"]}
    for label, vocabulary in words.items():
        (tmp_path / "texts" / label).mkdir(parents=True)
        for i in range(30):
            text = " ".join(rng.choice(vocabulary, 4))
            (tmp_path / "texts" / label / f"{i}.txt").write_text(text, encoding="utf-8")
    path = _config(tmp_path, {"name": "text_classes", "batch_size": 8, "seq_len": 32,
                              "path": str(tmp_path / "texts")},
                   {"name": "transformer_classifier", "features": 16, "num_heads": 2,
                    "num_layers": 1, "hidden_features": 32, "max_length": 32}, epochs=6)
    code, captured = _train(path, capsys)
    assert code == 0, captured.err
    run = load_run(tmp_path / "run")
    assert run.vocab is not None and set("applehammer") <= set(run.vocab.chars)
    # the run's vocabulary, not one rebuilt from texts changed since
    (tmp_path / "texts" / "fruit" / "0.txt").write_text("zzz qqq", encoding="utf-8")
    assert load_run(tmp_path / "run").vocab == run.vocab
    assert _accuracy(tmp_path / "run") > 0.9


@pytest.mark.parametrize("write, message", [
    (lambda d: np.savez(d / "a.npz", inputs=np.zeros((4, 2)), y=np.zeros(4, int)),
     r"a.npz.*x"),
    (lambda d: np.savez(d / "a.npz", x=np.zeros((4, 2)), y=np.zeros(4)), r"a.npz.*integer"),
])
def test_bad_npz_files(tmp_path, capsys, write, message):
    write(tmp_path)
    path = _config(tmp_path, {"name": "arrays", "batch_size": 2, "path": str(tmp_path / "a.npz")},
                   {"name": "mlp", "hidden_features": [4]})
    code, captured = _train(path, capsys)
    assert code == 2 and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith("fnn: error: ")
    import re

    assert re.search(message, captured.err), captured.err
    assert not (tmp_path / "run").exists()


def test_mix_in_a_config(tmp_path, capsys):
    digits = load_digits()
    np.savez(tmp_path / "train.npz", x=digits.x_train[:300], y=digits.y_train[:300])
    data = {"name": "arrays", "batch_size": 32, "path": str(tmp_path / "train.npz")}
    path = _config(tmp_path, data, {"name": "mlp", "hidden_features": [64], "flatten_axes": 3},
                   mix={"name": "cutmix", "alpha": 1.0}, epochs=6)
    code, captured = _train(path, capsys)
    assert code == 0, captured.err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["test_accuracy"] > 0.7 and "train_accuracy" in rows[-1]
    for mix, loss, message in (
            ({"name": "mixup"}, "softmax_cross_entropy", r"mix \(mixup\) is missing alpha"),
            ({"name": "mixup", "alpha": 0}, "softmax_cross_entropy",
             r"mix \(mixup\): alpha must be a number > 0, got 0"),
            ({"name": "mixin", "alpha": 1}, "softmax_cross_entropy",
             r"unknown key 'mixin' in mix.name; did you mean 'mixup'\?"),
            ({"name": "mixup", "alpha": 1}, "mean_squared_error",
             r"mix \(mixup\) gives soft labels, which softmax_cross_entropy takes; the loss is "
             r"mean_squared_error")):
        path = _config(tmp_path, data, {"name": "mlp", "hidden_features": [4]}, name="bad",
                       mix=mix, loss={"name": loss})
        code, captured = _train(path, capsys)
        assert code == 2 and len(captured.err.splitlines()) == 1, captured.err
        import re

        assert re.search(message, captured.err), captured.err


def test_augmentation_of_data_that_are_not_images_is_refused_before_any_write(tmp_path, capsys):
    np.savez(tmp_path / "rows.npz", x=np.zeros((40, 6), np.float32), y=np.arange(40) % 2)
    data = {"name": "arrays", "batch_size": 8, "path": str(tmp_path / "rows.npz")}
    path = _config(tmp_path, data, {"name": "mlp", "hidden_features": [4]}, epochs=1)
    assert _train(path, capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    path = _config(tmp_path, data, {"name": "mlp", "hidden_features": [4]},
                   augment=[{"name": "random_crop", "padding": 1}])
    code = main(["train", str(path), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("fnn: error: ") and "augment: in training on the data's batches: " \
        "RandomCrop" in err and "expected input [..., height, width, channels]" in err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before
    path = _config(tmp_path, data, {"name": "mlp", "hidden_features": [4]},
                   mix={"name": "cutmix", "alpha": 1.0})
    code = main(["train", str(path), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "mix (cutmix): on the data's batches: cutmix: expected" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_config_augmentation_is_applied_in_training_only(key):
    import jax

    from fnn.app.config import build_model, parse_config

    raw = yaml.safe_load((ROOT / "configs" / "digits_cnn.yaml").read_text())
    raw["model"]["dropout"] = 0.0  # training differs from evaluation by the noise alone
    raw["augment"] = [{"name": "gaussian_noise", "stddev": 1.0}]
    model = build_model(parse_config(raw))
    plain = build_model(parse_config(raw | {"augment": None}))
    x = load_digits().x_test[:4]
    params, state = plain.init(key, x)
    assert jax.tree.structure(model.init(key, x)) == jax.tree.structure((params, state))
    evaluation, _ = model.apply(params, state, x)
    np.testing.assert_array_equal(evaluation, plain.apply(params, state, x)[0])
    noisy, _ = model.apply(params, state, x, key=key, train=True)
    np.testing.assert_allclose(plain.apply(params, state, x, key=key, train=True)[0], evaluation,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(noisy, evaluation, atol=1e-3)
