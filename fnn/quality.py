"""How good a generative model's samples are, as a trained classifier (the *judge*) sees them:
the classes it predicts for them, how confident it is, and the Fréchet distance between its
penultimate features of the samples and of real images (FID's measure, with the judge in place
of Inception)::

    j = fnn.quality.judge(lenet, params, state)           # a classifier trained on the data
    report = fnn.quality.sample_report(j, samples, labels=labels, reference=x_test)
    report["frechet"], report["min_class_fraction"], report["accuracy"]
    fnn.quality.frechet_baselines(j, x_test, x_train)     # {"train": floor, "noise": baseline}

The distance depends on the judge and, through the covariances' estimates, on the number of
rows: compare distances made with the same judge, the same reference and the same number of
samples. Everything here runs on numpy in float64 but the judge's forward pass.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from fnn.core import Layer, Params, State, array_of
from fnn.inspection import Row, record_layers

__all__ = ["frechet_distance", "Judge", "judge", "sample_report", "frechet_baselines"]


# ----------------------------------------------------------------------------- Fréchet distance

def _gaussian(name: str, features: Any) -> tuple[np.ndarray, np.ndarray]:
    """The mean ``[D]`` and covariance ``[D, D]`` (float64, ``N - 1`` in the denominator) of
    ``features: [N, D]``, checked."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"frechet_distance: {name} must be features [N, D], got shape "
                         f"{x.shape}")
    if len(x) < 2:
        raise ValueError(f"frechet_distance: {name} needs at least 2 rows to fit a covariance, "
                         f"got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"frechet_distance: {name} has non-finite values "
                         f"({np.size(x) - np.isfinite(x).sum()} of {np.size(x)})")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    rounded below zero taken as zero)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """The squared Fréchet (2-Wasserstein) distance between Gaussians fitted to two feature
    sets ``[N_a, D]`` and ``[N_b, D]`` (the quantity FID reports)::

        |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)

    ``tr((C_a C_b)^1/2)`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric ``C_a^1/2 C_b C_a^1/2`` (numpy's ``eigh``: no scipy, no complex parts from
    round-off); a result rounded below zero is zero.

    >>> a = np.array([[0.0], [2.0]])   # mean 1, variance 2
    >>> round(frechet_distance(a, a + 1.0), 12)   # the means 1 apart, the same spread
    1.0
    """
    mean_a, cov_a = _gaussian("features_a", features_a)
    mean_b, cov_b = _gaussian("features_b", features_b)
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"frechet_distance: the feature sets must have the same width D, got "
                         f"features_a [{len(np.asarray(features_a))}, {mean_a.size}] and "
                         f"features_b [{len(np.asarray(features_b))}, {mean_b.size}]")
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    distance = (np.sum(np.square(mean_a - mean_b)) + np.trace(cov_a) + np.trace(cov_b)
                - 2.0 * trace_root)
    return float(max(distance, 0.0))


# ----------------------------------------------------------------------------- the judge

class Judge(NamedTuple):
    """A trained classifier that judges images: ``outputs(images) -> (logits, features)``.

    ``images: [N, ...]`` (what the classifier takes, in the data's scale); ``logits:
    float32[N, num_classes]``; ``features: float32[N, D]``, the input of the classifier's
    feature layer (by default its last ``Dense``), flattened per image.
    """

    outputs: Callable[[Any], tuple[np.ndarray, np.ndarray]]

    def logits(self, images: Any) -> np.ndarray:
        """``float32[N, num_classes]``: the classifier's logits of ``images: [N, ...]``."""
        return self.outputs(images)[0]

    def features(self, images: Any) -> np.ndarray:
        """``float32[N, D]``: the classifier's features of ``images: [N, ...]``."""
        return self.outputs(images)[1]


def _feature_row(model: Layer, rows: Sequence[Row], features_at: str | None) -> Row:
    """The call whose input the features are: the layer at path ``features_at``, or the last
    ``Dense`` applied."""
    if features_at is None:
        dense = [row for row in rows if row.name == "Dense"]
        if not dense:
            raise ValueError(f"judge: {model.name} applies no Dense layer, so its features "
                             f"cannot be found; name the layer whose input they are with "
                             f"features_at= (one of {[row.path for row in rows]})")
        return dense[-1]
    found = [row for row in rows if row.path == features_at]
    if not found:
        raise ValueError(f"judge: features_at must be the path of a layer of {model.name}, one "
                         f"of {[row.path for row in rows]}; got {features_at!r}")
    return found[-1]


def _forward(model: Layer, features_at: str | None, params: Params, state: State,
             x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``model``'s logits ``[B, num_classes]`` and features ``[B, D]`` of ``x: [B, ...]``."""
    with record_layers() as rows:
        logits, _ = model.apply(params, state, x)
    features = array_of(_feature_row(model, rows, features_at).input)
    return logits, features.reshape(features.shape[0], -1)


def _chunked(fn: Callable[[np.ndarray], tuple], x: np.ndarray,
             batch_size: int) -> tuple[np.ndarray, ...]:
    """``fn`` over ``x`` in chunks of ``batch_size`` rows, the last one padded with zeros (one
    compiled program for every call); the outputs concatenated and cut to ``len(x)`` rows."""
    n = len(x)
    padded = np.concatenate([x, np.zeros((-n % batch_size,) + x.shape[1:], x.dtype)])
    parts = [jax.device_get(fn(padded[i:i + batch_size]))
             for i in range(0, len(padded), batch_size)]
    return tuple(np.concatenate(outputs)[:n] for outputs in zip(*parts))


def judge(model: Layer, params: Params, state: State, *, features_at: str | None = None,
          batch_size: int = 500) -> Judge:
    """A :class:`Judge` of a trained classifier ``model`` (with its ``params`` and ``state``),
    applied in evaluation mode, jitted, in chunks of ``batch_size`` images.

    Its features are the input of the layer at path ``features_at`` (default: of the last
    ``Dense`` layer applied, e.g. ``"head"`` in :func:`fnn.models.LeNet`: the ``Relu`` of
    ``fc``), found by :func:`fnn.inspection.record_layers`.

    >>> import jax, jax.numpy as jnp, fnn
    >>> lenet = fnn.models.LeNet(10, features=(8,), kernel_size=3, hidden_features=16)
    >>> params, state = lenet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    >>> logits, features = judge(lenet, params, state).outputs(np.zeros((3, 8, 8, 1)))
    >>> logits.shape, features.shape   # [N, num_classes], [N, hidden_features]
    ((3, 10), (3, 16))
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"judge: batch_size must be a positive int, got {batch_size!r}")

    forward = jax.jit(functools.partial(_forward, model, features_at))

    def outputs(images: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(images)
        if x.ndim < 1 or len(x) == 0:
            raise ValueError(f"judge: expected a batch of images [N, ...] with N >= 1, got "
                             f"shape {x.shape}")
        logits, features = _chunked(
            lambda chunk: forward(params, state, chunk), x, batch_size)
        return logits.astype(np.float32), features.astype(np.float32)

    return Judge(outputs)


# ----------------------------------------------------------------------------- reports

def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"sample_report: labels must be int[{n}] (one per sample), got "
                         f"{y.dtype}{list(y.shape)}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"sample_report: labels must lie in [0, {num_classes}), got "
                         f"{y.min()} to {y.max()}")
    return y


def sample_report(judge: Judge, samples: Any, *, labels: Any = None, reference: Any,
                  num_classes: int = 10) -> dict[str, Any]:
    """What ``judge`` makes of ``samples: [N, H, W, C]`` (in the data's scale): a dict of

    - ``class_fractions``: ``num_classes`` floats, the fraction of samples predicted as each
      class; ``min_class_fraction``, the smallest (``1 / num_classes`` when the classes are
      balanced, 0 when one is never drawn);
    - ``mean_confidence``: the mean over samples of the largest softmax probability;
    - ``accuracy`` (only with ``labels: int[N]``, the classes the samples were drawn for): the
      fraction predicted as their label;
    - ``frechet``: :func:`frechet_distance` of the samples' features to those of the
      ``reference`` images ``[M, H, W, C]`` (real images, e.g. the test split).
    """
    logits, features = judge.outputs(samples)
    n = len(logits)
    if logits.shape != (n, num_classes):
        raise ValueError(f"sample_report: the judge's logits must be [{n}, {num_classes}] "
                         f"(num_classes={num_classes}), got {list(logits.shape)}")
    probabilities = _softmax(logits)  # [N, num_classes]
    predicted = probabilities.argmax(axis=-1)  # [N]
    fractions = np.bincount(predicted, minlength=num_classes) / n
    report: dict[str, Any] = {"class_fractions": [float(f) for f in fractions],
                              "min_class_fraction": float(fractions.min()),
                              "mean_confidence": float(probabilities.max(axis=-1).mean())}
    if labels is not None:
        report["accuracy"] = float(np.mean(predicted == _check_labels(labels, n, num_classes)))
    report["frechet"] = frechet_distance(features, judge.features(reference))
    return report


def frechet_baselines(judge: Judge, reference: Any, train: Any, *, num: int = 1000,
                      seed: int = 0, data_range: Sequence[float] | None = None
                      ) -> dict[str, float]:
    """Two distances to read a sample's :func:`frechet_distance` to ``reference`` against:

    - ``"train"``: ``min(num, len(train))`` images of the training split ``train: [N, H, W,
      C]`` (drawn without replacement): real images, the floor a perfect generator reaches;
    - ``"noise"``: ``num`` images of Gaussian noise with the training split's per-pixel mean
      and variance, clipped to ``data_range`` (default: the training split's minimum and
      maximum): a generator that learned only the first two moments of each pixel.

    Use the ``num`` of the samples compared with them: the distance grows as the rows shrink.
    """
    if not isinstance(num, int) or isinstance(num, bool) or num < 2:
        raise ValueError(f"frechet_baselines: num must be an int >= 2, got {num!r}")
    x = np.asarray(train)
    low, high = (x.min(), x.max()) if data_range is None else data_range
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), size=min(num, len(x)), replace=False)
    noise = rng.standard_normal((num,) + x.shape[1:]) * x.std(axis=0) + x.mean(axis=0)
    real = judge.features(reference)
    return {"train": frechet_distance(judge.features(x[rows]), real),
            "noise": frechet_distance(judge.features(np.clip(noise, low, high).astype(x.dtype)),
                                      real)}
