"""fnn.quality: the Fréchet distance against closed forms and scipy, sample reports of a
hand-made classifier whose answers are known, the judge of a LeNet, the baselines; and the
parts of benchmarks/sample_quality.py that need no run."""

import importlib.util
import itertools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.app.config import load_config
from fnn.inspection import capture_intermediates
from fnn.quality import Judge, frechet_baselines, frechet_distance, judge, sample_report


def _factorial(mean, std):
    """Every sign pattern of ``mean +- std`` (``2 ** D`` rows): a set whose covariance is
    exactly diagonal."""
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=len(mean))))
    return np.asarray(mean) + signs * np.asarray(std)


# ----------------------------------------------------------------------------- Fréchet distance

def test_frechet_of_diagonal_gaussians_is_the_closed_form():
    a = _factorial([0.0, 1.0, -2.0], [1.0, 2.0, 0.5])
    b = _factorial([1.0, 1.0, 0.0], [3.0, 0.5, 0.5])
    var_a, var_b = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
    expected = (np.sum(np.square(a.mean(0) - b.mean(0)))
                + np.sum(np.square(np.sqrt(var_a) - np.sqrt(var_b))))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = (np.sum(np.square(a.mean(0) - b.mean(0))) + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(root))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_is_symmetric_and_zero_for_identical_sets():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((150, 8)) * 2.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a) >= 0.0


def test_frechet_of_rank_deficient_covariances():
    """Fewer rows than features (singular covariances): still finite and as the closed form
    of two point pairs (one direction of spread each)."""
    a = np.zeros((2, 4))
    a[:, 0] = [-1.0, 1.0]  # variance 2 along the first axis
    b = np.zeros((2, 4))
    b[:, 1] = [-2.0, 2.0]  # variance 8 along the second
    assert frechet_distance(a, b) == pytest.approx(2.0 + 8.0, rel=1e-12)


@pytest.mark.parametrize("a, b, message", [
    (np.zeros((5, 3)), np.zeros((5, 4)), "the feature sets must have the same width D"),
    (np.zeros((1, 3)), np.zeros((5, 3)), "features_a needs at least 2 rows"),
    (np.zeros((5, 3)), np.zeros((5,)), "features_b must be features"),
    (np.zeros((5, 3)), np.full((5, 3), np.nan), "features_b has non-finite values"),
])
def test_frechet_errors(a, b, message):
    with pytest.raises(ValueError, match=f"frechet_distance: {message}"):
        frechet_distance(a, b)


# ----------------------------------------------------------------------------- sample reports

def _identity_classifier(num_classes):
    """A classifier whose logits are its input ``[N, 1, 1, K]`` flattened (its head an identity
    ``Dense``), so its features are the input too."""
    model = fnn.serial(flatten=fnn.Flatten(-3), head=fnn.Dense(num_classes))
    params, state = model.init(jax.random.key(0), jnp.zeros((1, 1, 1, num_classes)))
    params = {"head": {"w": jnp.eye(num_classes), "b": jnp.zeros(num_classes)}}
    return judge(model, params, state)


def test_sample_report_of_a_classifier_with_known_answers():
    logits = np.array([[math.log(2), 0, 0],    # class 0, confidence 2/4
                       [0, math.log(3), 0],    # class 1, 3/5
                       [0, math.log(3), 0],    # class 1, 3/5
                       [0, 0, math.log(7)]])   # class 2, 7/9
    samples = logits.reshape(4, 1, 1, 3).astype(np.float32)
    report = sample_report(_identity_classifier(3), samples, labels=np.array([0, 1, 2, 2]),
                           reference=samples + 1.0, num_classes=3)
    assert report["class_fractions"] == pytest.approx([0.25, 0.5, 0.25])
    assert report["min_class_fraction"] == pytest.approx(0.25)
    assert report["mean_confidence"] == pytest.approx((2 / 4 + 3 / 5 + 3 / 5 + 7 / 9) / 4,
                                                      rel=1e-6)
    assert report["accuracy"] == pytest.approx(0.75)
    # the features are the samples; the reference is them shifted by 1 in each of 3 axes
    assert report["frechet"] == pytest.approx(3.0, rel=1e-5)


def test_sample_report_without_labels_and_a_missing_class():
    samples = np.array([[5.0, 0, 0], [4.0, 0, 0], [0, 0, 3.0]],
                       np.float32).reshape(3, 1, 1, 3)
    report = sample_report(_identity_classifier(3), samples, reference=samples,
                           num_classes=3)
    assert "accuracy" not in report
    assert report["class_fractions"] == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert report["min_class_fraction"] == 0.0
    assert report["frechet"] == pytest.approx(0.0, abs=1e-6)


def test_sample_report_errors():
    classifier = _identity_classifier(3)
    samples = np.eye(3, dtype=np.float32).reshape(3, 1, 1, 3)
    with pytest.raises(ValueError, match=r"logits must be \[3, 10\] \(num_classes=10\)"):
        sample_report(classifier, samples, reference=samples)
    with pytest.raises(ValueError, match=r"labels must be int\[3\]"):
        sample_report(classifier, samples, labels=[0, 1], reference=samples, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 0 to 3"):
        sample_report(classifier, samples, labels=[0, 1, 3], reference=samples, num_classes=3)


# ----------------------------------------------------------------------------- the judge

@pytest.fixture(scope="module")
def lenet():
    model = fnn.models.LeNet(10, features=(8,), kernel_size=3, hidden_features=16)
    params, state = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    return model, params, state


def test_judge_of_a_lenet_gives_its_logits_and_penultimate_features(lenet):
    model, params, state = lenet
    x = np.asarray(jax.random.uniform(jax.random.key(1), (7, 8, 8, 1)))
    logits, features = judge(model, params, state, batch_size=3).outputs(x)  # 3 chunks, padded
    assert logits.shape == (7, 10) and features.shape == (7, 16)
    want_logits, _, outputs = capture_intermediates(model, params, state, jnp.asarray(x))
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features, outputs["relu"], rtol=1e-5, atol=1e-6)  # head's input
    assert (features >= 0).all() and features.any()


def test_judge_features_at_names_the_layer(lenet):
    model, params, state = lenet
    x = np.zeros((2, 8, 8, 1), np.float32)
    assert judge(model, params, state, features_at="fc").features(x).shape == (2, 4 * 4 * 8)
    with pytest.raises(ValueError, match=r"judge: features_at must be the path of a layer of "
                                         r"LeNet, one of \[.*'head'\]; got 'nope'"):
        judge(model, params, state, features_at="nope").features(x)


def test_judge_errors(lenet):
    no_dense = fnn.serial(fnn.Flatten(-3))
    with pytest.raises(ValueError, match="judge: serial applies no Dense layer"):
        judge(no_dense, {}, {}).features(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="judge: batch_size must be a positive int, got 0"):
        judge(*lenet, batch_size=0)
    with pytest.raises(ValueError, match=r"judge: expected a batch of images \[N, ...\]"):
        judge(*lenet).features(np.zeros((0, 8, 8, 1), np.float32))


# ----------------------------------------------------------------------------- baselines

def _recording_judge(seen):
    """A judge whose features are the images themselves, flattened; it keeps what it saw."""
    def outputs(images):
        x = np.asarray(images, np.float32)
        seen.append(x)
        return np.zeros((len(x), 10), np.float32), x.reshape(len(x), -1)
    return Judge(outputs)


def test_frechet_baselines_draw_real_rows_and_clipped_moment_matched_noise():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((4, 4))  # correlated pixels
    train = (rng.standard_normal((600, 4)) @ mixing / 4).reshape(600, 2, 2, 1).astype(np.float32)
    reference = train[:300]
    seen = []
    distances = frechet_baselines(_recording_judge(seen), reference, train, num=400, seed=1)
    _, real_rows, noise = seen
    assert real_rows.shape == noise.shape == (400, 2, 2, 1)
    rows = [np.flatnonzero((train == row).all(axis=(1, 2, 3)))[0] for row in real_rows]
    assert len(set(rows)) == 400  # rows of train, without replacement
    assert noise.min() >= train.min() and noise.max() <= train.max()  # clipped
    np.testing.assert_allclose(noise.mean(axis=0), train.mean(axis=0), atol=0.05)
    # the features are the pixels: the noise lacks their correlations, the real rows do not
    assert 0 <= distances["train"] < distances["noise"]
    assert distances["train"] == pytest.approx(frechet_distance(real_rows.reshape(400, 4),
                                                                reference.reshape(300, 4)))


def test_frechet_baselines_take_at_most_the_training_rows_and_a_data_range():
    seen = []
    train = np.linspace(0, 1, 40, dtype=np.float32).reshape(10, 2, 2, 1)
    frechet_baselines(_recording_judge(seen), train, train, num=50, data_range=(0.4, 0.6))
    _, real_rows, noise = seen
    assert len(real_rows) == 10 and len(noise) == 50
    assert noise.min() >= 0.4 and noise.max() <= 0.6
    with pytest.raises(ValueError, match="frechet_baselines: num must be an int >= 2, got 1"):
        frechet_baselines(_recording_judge([]), train, train, num=1)


# ----------------------------------------------------------------------------- the benchmark

@pytest.fixture(scope="module")
def bench():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sample_quality.py"
    spec = importlib.util.spec_from_file_location("sample_quality_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_draws_in_equal_chunks_with_the_classes_in_turn(bench):
    calls = []

    def sample(key, n, **options):
        calls.append((n, options))
        return np.full((n, 8, 8, 1), len(calls), np.float32)

    samples, labels = bench.draw(sample, 600, jax.random.key(0), num_classes=10, steps=50,
                                 guidance=2.0)
    assert [n for n, _ in calls] == [250, 250, 250]  # one size: one compiled sampler
    assert samples.shape == (600, 8, 8, 1) and samples[-1, 0, 0, 0] == 3
    np.testing.assert_array_equal(labels, np.arange(600) % 10)
    np.testing.assert_array_equal(calls[1][1]["labels"], np.arange(250, 500) % 10)
    assert all(o["steps"] == 50 and o["guidance"] == 2.0 for _, o in calls)
    calls.clear()
    samples, labels = bench.draw(sample, 7, jax.random.key(0))
    assert labels is None and [n for n, _ in calls] == [7] and calls[0][1] == {}


def test_benchmark_sampling_settings_per_kind_of_run(bench):
    config = load_config(
        pathlib.Path(bench.__file__).parents[1] / "configs" / "digits_ddpm.yaml")
    assert bench.sampling(config, None) == [
        ("guidance 2", {"steps": 50, "guidance": 2.0, "num_classes": 10})]
    assert [what for what, _ in bench.sampling(config, [1.0, 3.5])] == ["guidance 1",
                                                                       "guidance 3.5"]
    gan = load_config(
        pathlib.Path(bench.__file__).parents[1] / "configs" / "digits_gan.yaml")
    assert bench.sampling(gan, [2.0]) == [("", {})]


def test_benchmark_table(bench):
    row = bench.report_row("run", 100, {"accuracy": 0.5, "min_class_fraction": 0.0625,
                                        "mean_confidence": 0.9, "frechet": 1.23456})
    assert row == ("run", "100", "0.5000", "0.0625", "0.9000", "1.235")
    assert bench.report_row("noise", 10, {"frechet": 2.0})[2:5] == ("-", "-", "-")
    table = bench.markdown([row])
    assert table.splitlines()[1] == "|---|---:|---:|---:|---:|---:|"
    assert table.splitlines()[2] == "| run | 100 | 0.5000 | 0.0625 | 0.9000 | 1.235 |"
    assert bench.parse_guidance("1,2.5") == [1.0, 2.5]
    with pytest.raises(Exception, match="expected scales such as 1,2,4"):
        bench.parse_guidance("1,x")


def test_a_trained_judge_puts_real_digits_below_noise():
    """A LeNet trained briefly on the digits: real images are closer to the test split than
    moment-matched noise is, and it classifies the test split."""
    import optax

    data = fnn.data.load_digits()
    model = fnn.models.LeNet(10, features=(16,), kernel_size=3, hidden_features=32)
    ts, _ = fnn.train.fit(model, optax.adam(3e-3), data, fnn.losses.softmax_cross_entropy,
                          epochs=3, batch_size=64, progress=False)
    j = judge(model, ts.params, ts.state)
    report = sample_report(j, data.x_test, labels=data.y_test, reference=data.x_train)
    assert report["accuracy"] > 0.8
    distances = frechet_baselines(j, data.x_test, data.x_train, num=500)
    assert 0 < distances["train"] < distances["noise"] / 3
