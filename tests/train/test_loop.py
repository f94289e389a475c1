"""The training loop: tasks (batches as a function of the step), checkpoints and resume,
non-finite steps, data-parallel runs through the loop."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn

from fnn.data import batches, load_digits, load_text, sequence_batches
from fnn.data.text import TextSplit, Vocab
from fnn.losses import softmax_cross_entropy
from fnn.models import MLP
from fnn.train import NonFiniteError, classification_task, fit, language_model_task, train
from fnn.train.checkpoint import list_steps
from fnn.train.parallel import DATA_AXIS


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data._replace(x_train=data.x_train[:256], y_train=data.y_train[:256],
                         x_test=data.x_test[:100], y_test=data.y_test[:100])


def _mlp():
    return MLP([32], 10, flatten_axes=3, dropout=0.1)


def test_classification_task_batches_are_those_of_each_epoch(digits):
    task = classification_task(digits, 32, seed=3)
    assert task.steps_per_epoch == 8
    for epoch in (1, 2):
        expected = list(batches(digits.x_train, digits.y_train, 32, seed=3, epoch=epoch))
        for i, (x, y) in enumerate(expected):
            got_x, got_y = task.batch((epoch - 1) * 8 + i)
            np.testing.assert_array_equal(got_x, x)
            np.testing.assert_array_equal(got_y, y)
    assert sum(len(x) for x, _ in task.eval_batches()) == 100


def test_language_model_task_batches_and_every_validation_window():
    text = "the quick brown fox jumps over the lazy dog. " * 40
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    split = TextSplit(ids[:1500], ids[1500:], vocab)  # 300 validation ids
    task = language_model_task(split, 4, 16, seed=5, eval_batch_size=8)
    assert task.steps_per_epoch == (1500 - 1) // 16 // 4
    expected = list(sequence_batches(split.train, 4, 16, seed=5, epoch=2))
    x, y = task.batch(task.steps_per_epoch + 1)  # epoch 2, second batch
    np.testing.assert_array_equal(x, expected[1][0])
    np.testing.assert_array_equal(y, expected[1][1])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    # (300 - 1) // 16 = 18 whole validation windows: batches of 8, 8 and 2, each window once
    held_out = list(task.eval_batches())
    assert [len(x) for x, _ in held_out] == [8, 8, 2]
    windows = np.concatenate([x for x, _ in held_out])
    np.testing.assert_array_equal(windows.reshape(-1), split.valid[:18 * 16])
    assert set(task.metrics) == {"bits_per_char", "accuracy"}


def _strip_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_resume_from_a_checkpoint_ends_bit_identical(digits, tmp_path):
    """A run stopped after step 16 of 24 and resumed equals the run left alone: params,
    optimizer state, key and the whole history (train means included)."""
    task = classification_task(digits, 32, seed=1)
    common = dict(num_steps=24, seed=1, eval_every=8, checkpoint_every=4, keep=10,
                  progress=False)
    whole, history = train(_mlp(), optax.adam(3e-3), softmax_cross_entropy, task,
                           checkpoint_dir=tmp_path / "a", **common)
    assert list_steps(tmp_path / "a") == [4, 8, 12, 16, 20, 24]
    # the run directory as a run killed between steps 16 and 20 leaves it
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for step in (20, 24):
        shutil.rmtree(tmp_path / "b" / f"step_{step:08d}")
    assert list_steps(tmp_path / "b") == [4, 8, 12, 16]
    resumed, resumed_history = train(_mlp(), optax.adam(3e-3), softmax_cross_entropy, task,
                                     checkpoint_dir=tmp_path / "b", resume=True, **common)
    jax.tree.map(np.testing.assert_array_equal, jax.random.key_data(whole.key),
                 jax.random.key_data(resumed.key))
    jax.tree.map(np.testing.assert_array_equal, (whole.params, whole.opt_state, whole.step),
                 (resumed.params, resumed.opt_state, resumed.step))
    assert _strip_time(resumed_history) == _strip_time(history)
    assert [row["step"] for row in history] == [8, 16, 24]
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_resume_without_checkpoints_starts_fresh_and_past_the_end_is_an_error(digits, tmp_path):
    task = classification_task(digits, 64, seed=0)
    ts, history = train(_mlp(), optax.adam(1e-3), softmax_cross_entropy, task, num_steps=4,
                        checkpoint_dir=tmp_path, resume=True, progress=False)
    assert int(ts.step) == 4 and list_steps(tmp_path) == [4]
    with pytest.raises(ValueError, match="checkpoint .* is at step 4, past the run's 2 steps"):
        train(_mlp(), optax.adam(1e-3), softmax_cross_entropy, task, num_steps=2,
              checkpoint_dir=tmp_path, resume=True, progress=False)


def _poisoned(task, bad_steps):
    def batch(step):
        x, y = task.batch(step)
        return (np.full_like(x, np.nan), y) if step in bad_steps else (x, y)

    return task._replace(batch=batch)


def test_a_non_finite_step_is_skipped_and_counted(digits):
    task = classification_task(digits, 32, seed=0)
    ts, history = train(_mlp(), optax.adam(1e-3), softmax_cross_entropy,
                        _poisoned(task, {2, 5}), num_steps=16, eval_every=8, progress=False)
    assert [row["skipped"] for row in history] == [2, 2]
    assert int(ts.skipped) == 2 and int(ts.bad_streak) == 0
    assert all(np.isfinite(row["train_loss"]) for row in history)
    assert all(bool(np.isfinite(p).all()) for p in jax.tree.leaves(ts.params))


def test_an_interval_of_only_skipped_steps_logs_null_train_means(digits, tmp_path):
    task = classification_task(digits, 32, seed=0)
    ts, history = train(_mlp(), optax.adam(1e-3), softmax_cross_entropy, _poisoned(task, {0, 1}),
                        num_steps=4, eval_every=2, checkpoint_dir=tmp_path, checkpoint_every=2,
                        progress=False)
    assert history[0]["train_loss"] is None and history[0]["skipped"] == 2
    assert np.isfinite(history[1]["train_loss"]) and list_steps(tmp_path) == [2, 4]


def test_consecutive_non_finite_steps_stop_the_run_naming_the_cause(digits):
    task = classification_task(digits, 32, seed=0)
    with pytest.raises(NonFiniteError) as info:
        train(_mlp(), optax.adam(1e-3), softmax_cross_entropy, _poisoned(task, set(range(3, 99))),
              num_steps=16, max_bad_steps=4, progress=False)
    message = str(info.value)
    assert "4 consecutive train steps (steps 4 to 7)" in message
    assert "max_bad_steps=4" in message
    assert "input" in message and "NaN" in message


@pytest.mark.parametrize("mode", ["pmap", "sharded", "shard_map", "fsdp", "tensor"])
def test_data_parallel_runs_of_the_loop_equal_the_plain_run(digits, mode):
    task = classification_task(digits, 32, seed=2)
    model = MLP([32], 10, flatten_axes=3)  # no dropout: devices draw their own masks
    common = dict(num_steps=10, seed=2, eval_every=5, progress=False)
    plain, plain_history = train(model, optax.adam(3e-3), softmax_cross_entropy, task,
                                 **common)
    ts, history = train(model, optax.adam(3e-3), softmax_cross_entropy, task, parallel=mode,
                        devices=jax.devices()[:4], **common)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 plain.params, ts.params)
    for row, plain_row in zip(history, plain_history):
        assert row["test_accuracy"] == pytest.approx(plain_row["test_accuracy"], abs=0.011)
        assert row["train_loss"] == pytest.approx(plain_row["train_loss"], rel=1e-4)


def test_language_model_training_lowers_validation_bits_per_char():
    from fnn.models import GPT

    text = load_text()
    short = text._replace(train=text.train[:40_000], valid=text.valid[:4_000])
    task = language_model_task(short, 16, 32, seed=0)
    model = GPT(text.vocab.size, features=32, num_heads=2, num_layers=1, hidden_features=64,
                max_length=32)
    _, history = train(model, optax.adam(3e-3), softmax_cross_entropy, task, num_steps=60,
                       eval_every=20, progress=False)
    bits = [row["valid_bits_per_char"] for row in history]
    assert bits[0] < np.log2(text.vocab.size)  # better than uniform after 20 steps
    assert bits[-1] < bits[0] - 0.3
    assert json.dumps(history)  # rows are plain JSON


def test_the_stop_names_the_cause_also_for_a_cross_device_batchnorm_under_pmap(digits):
    """The debug pass runs outside pmap, where a BatchNorm with ``axis_name`` has no axis to
    average over: it still names the layer (in evaluation mode) instead of failing."""
    task = classification_task(digits, 32, seed=0)
    model = fnn.serial(fnn.Flatten(start_axis=-3), fnn.Dense(16), fnn.Lambda(jnp.log),
                       fnn.BatchNorm(axis_name=DATA_AXIS), fnn.Dense(10))  # log(< 0): NaN
    with pytest.raises(NonFiniteError) as info:
        train(model, optax.adam(1e-3), softmax_cross_entropy, task, num_steps=8,
              max_bad_steps=2, parallel="pmap", devices=jax.devices()[:2], progress=False)
    message = str(info.value)
    assert "2 consecutive train steps (steps 1 to 2)" in message
    assert "the output of Lambda at 2 has NaN" in message, message
    assert "evaluation mode" in message and "outside pmap" in message, message


def test_fit_is_deterministic_and_learns():
    data = load_digits()
    small = data._replace(x_train=data.x_train[:512], y_train=data.y_train[:512])

    def run():
        return fit(MLP([64], 10, flatten_axes=3, dropout=0.1), optax.adam(3e-3), small,
                   softmax_cross_entropy, epochs=5, batch_size=32, seed=7, progress=False)

    ts1, history = run()
    ts2, _ = run()
    jax.tree.map(np.testing.assert_array_equal, ts1.params, ts2.params)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["test_accuracy"] > 0.85
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_a_head_narrower_than_the_labels_is_refused_before_training(digits):
    # 5 outputs for 10 digit classes trained to 46.8% without a word before (smoothing made
    # the out-of-range labels' loss finite): now an error before any step
    task = classification_task(digits, 32)
    assert task.num_classes == 10
    narrow = MLP([16], 5, flatten_axes=3)
    with pytest.raises(ValueError, match=r"^train: the model's output float32\[32, 5\] has 5 "
                                         r"classes on its last axis, but the task's labels go "
                                         r"up to 9: give the model a head of 10 outputs$"):
        train(narrow, optax.adam(1e-3), softmax_cross_entropy, task, num_steps=1,
              progress=False)
    with pytest.raises(ValueError, match=r"train: the model's output .* 5 classes"):
        fit(narrow, optax.adam(1e-3), digits, softmax_cross_entropy, epochs=1, batch_size=32,
            progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"^fit: batch_size must be a positive int, got 0$"),
    (dict(batch_size=-180), r"^fit: batch_size must be a positive int, got -180$"),
    (dict(batch_size=2.5), r"^fit: batch_size must be a positive int, got 2.5$"),
    (dict(epochs=0), r"^fit: epochs must be a positive int, got 0$"),
    (dict(eval_batch_size=0), r"^fit: eval_batch_size must be a positive int, got 0$"),
    (dict(resume=True), r"^fit: resume=True needs the checkpoint_dir to resume from$"),
    (dict(batch_size=1000), r"^fit: batch_size 1000 is larger than the training set \(256 "
                            r"examples\)$"),
])
def test_fit_checks_its_arguments_and_names_itself(digits, kwargs, message):
    args = dict(epochs=1, batch_size=32, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        fit(_mlp(), optax.adam(1e-3), digits, softmax_cross_entropy, **args)


def test_classification_task_checks_its_data(digits):
    with pytest.raises(ValueError, match=r"^classification_task: x_train and y_train must have "
                                         r"the same length, got 256 and 255$"):
        classification_task(digits._replace(y_train=digits.y_train[:-1]), 32)
    with pytest.raises(ValueError, match=r"y_test must hold class ids >= 0, got -1 \(at index "
                                         r"3\)"):
        classification_task(digits._replace(y_test=np.where(np.arange(100) == 3, -1,
                                                            digits.y_test)), 32)
    with pytest.raises(ValueError, match=r"y_train must hold integer class ids, got float32"):
        classification_task(digits._replace(y_train=digits.y_train.astype(np.float32)), 32)
    with pytest.raises(ValueError, match=r"^train: resume=True needs the checkpoint_dir"):
        train(_mlp(), optax.adam(1e-3), softmax_cross_entropy, classification_task(digits, 32),
              num_steps=1, resume=True, progress=False)


def test_language_model_task_checks_the_ids_against_the_vocabulary():
    vocab = Vocab.from_text("abcd")
    text = TextSplit(np.array([0, 1, 2, 3] * 20, np.int32), np.array([0, 1, 7] * 10, np.int32),
                     vocab)
    with pytest.raises(ValueError, match=r"^language_model_task: the ids go up to 7, outside "
                                         r"the vocabulary of 4 characters$"):
        language_model_task(text, 2, 4)
    with pytest.raises(ValueError, match=r"^language_model_task: seq_len must be a positive "
                                         r"int, got 0$"):
        language_model_task(text._replace(valid=text.train), 2, 0)


def test_resume_in_python_skips_a_corrupt_latest_checkpoint_and_keeps_it(digits, tmp_path):
    task = classification_task(digits, 64, seed=0)
    train(_mlp(), optax.adam(1e-3), softmax_cross_entropy, task, num_steps=8,
          checkpoint_dir=tmp_path, checkpoint_every=4, progress=False)
    data = tmp_path / "step_00000008" / "arrays.bin"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.warns(UserWarning, match=r"the checkpoint of step 8 is corrupt .*; resuming "
                                         r"from step 4 instead, the corrupt one moved to "):
        ts, _ = train(_mlp(), optax.adam(1e-3), softmax_cross_entropy, task, num_steps=8,
                      checkpoint_dir=tmp_path, checkpoint_every=4, resume=True, progress=False)
    assert int(ts.step) == 8 and list_steps(tmp_path) == [4, 8]
    assert [p.name[:21] for p in tmp_path.iterdir() if p.name.startswith("corrupt")] == [
        "corrupt-step_00000008"]


def test_evaluation_weights_seq_batches_by_their_rows():
    from fnn.train.loop import evaluate_batches

    def eval_step(params, state, x, y):
        return {"rows": jnp.asarray(float(x.x.shape[0]))}

    def seq(rows):
        return fnn.Seq(jnp.zeros((rows, 3, 2)), lengths=jnp.full((rows,), 3))

    # batches of 10 and 2 rows: the mean of "rows" weighted by rows is (100 + 4) / 12
    result = evaluate_batches(eval_step, {}, {}, [(seq(10), None), (seq(2), None)])
    assert result == {"rows": pytest.approx(104 / 12)}
