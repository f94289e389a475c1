"""Run configurations for ``fnn train``: YAML files in ``configs/``, checked strictly.

A config has these sections (see ``configs/digits_cnn.yaml``)::

    model:     {name: lenet, ...keyword arguments of the model factory}
    data:      {name: digits, batch_size: 64}    # or text, arrays, csv, images, ...: below
    optimizer: {name: adamw, learning_rate: 0.002, ...keyword arguments of the optax optimizer,
                frozen: [trunk/**], groups: [{params: [head/**], learning_rate: 0.01}],
                weight_decay_mask: weights}   # the last three optional: see below
    schedule:  {name: cosine, warmup_steps: 0}       # constant | cosine
    loss:      {name: softmax_cross_entropy, ...keyword arguments of the loss}
    epochs: 30
    seed: 0
    output_dir: runs/digits_cnn
    # optional, with their defaults:
    parallel: {mode: none, devices: null}  # none | pmap | sharded | shard_map | fsdp | tensor;
                                           # devices: how many (null: all); fsdp and tensor
                                           # also take mesh: {data: 2, model: 4} and rules:
                                           # {"**/ffn/up/w": [null, model], ...}
    precision: float32                     # or bfloat16 / float16: compute dtype, f32 params
    checkpoint: {every: null, keep: 3}     # save every N steps (and at the end); keep the last K
    eval_every: 1                          # evaluate (and log a metrics row) every N epochs
    max_bad_steps: 10                      # stop after this many non-finite steps in a row
    host_malloc: default                   # or tuned: see fnn.app.runtime.tune_host_malloc
    init: null                             # or {from: runs/x, take: [trunk/**]}: start from a run
    augment: null                          # or [{name: random_crop, padding: 1}, ...]: below
    mix: null                              # or {name: mixup, alpha: 0.2} (or cutmix): below
    gan: null                              # a GAN: {discriminator: {name: ...}, ...}: below
    diffusion: null                        # a diffusion model: {noise_schedule: cosine, ...}

Parameter groups (:mod:`fnn.train.groups`; patterns are paths like ``trunk/**`` or ``**/b``):
``optimizer.frozen`` lists the parameters that are not trained (no update, no optimizer state);
``optimizer.groups`` gives parameters other optimizer arguments (each group: ``params``, its
patterns, and any argument of the optimizer: ``learning_rate``, ``weight_decay``, ...). For an
optimizer with weight decay and a ``mask`` (adamw, lamb, lion) ``weight_decay_mask: weights``
(the default) decays only the weights, not biases and norm parameters
(:func:`fnn.train.decay_mask`); ``all`` decays every parameter. ``init.from`` starts a fresh
run from the params and state of another run's newest intact checkpoint, those at the paths
``init.take`` matches (default: all of them), the rest initialised as usual.

Every key is checked: an unknown or mistyped key raises :class:`ConfigError` naming it, where it
is, and the closest valid key. Every value is checked too (:mod:`fnn.app.values`): its type
against what the function it is given to takes (``learning_rate: 1e-3`` is a number, as users
write it), its range where one can be meant (a positive learning rate, a drop probability in
``[0, 1)``), the model's hyper-parameters by building the model (no JAX computation), and
``data.seq_len`` against the model's ``max_length``.

Data (:mod:`fnn.data.files` reads users' own files; without ``test_path`` a fixed, stratified
``test_fraction`` of ``path``, default 0.2, is the test set)::

    {name: digits, batch_size}                       the 8x8 digits bundled with scikit-learn
    {name: text, batch_size, seq_len, path}          characters of a UTF-8 file (language models)
    {name: arrays, batch_size, path, test_path}      an .npz with x and y (integer labels)
    {name: csv, batch_size, path, label_column}      numeric columns and a label column
    {name: images, batch_size, path, size, channels} one folder per class of PNG/JPEG images
    {name: text_classes, batch_size, path, seq_len}  one folder per class of .txt files

Language models (``charlstm``, ``gpt``) train on ``text``, ``transformer_classifier`` on
``text_classes``; their ``vocab_size`` comes from the data. ``mlp`` trains on images, arrays or
CSV rows, ``lenet``, ``resnet`` and ``vit`` on images (``digits``, ``images``, ``arrays``).
The number of classes (``num_classes``, ``out_features``) comes from the data when the config
leaves it out.

``augment`` lists augmentation layers (:mod:`fnn.layers.augment`: ``random_crop``,
``random_translate``, ``random_flip``, ``gaussian_noise``, ``cutout``, each with its factory's
arguments) applied to image batches in training only, in order, before the model; the model's
params are the same as without them. ``mix`` mixes every training batch with a permutation
of itself, inputs and labels (:func:`fnn.mixup`; :func:`fnn.cutmix` pastes a box of the other
image), for ``softmax_cross_entropy``, which takes the mixed (soft) labels.

Generative models train on images (``digits``, ``images``, ``arrays``) in the data's own scale
(the training images' smallest to largest value, kept in ``inputs.json``), with no ``loss``
section: the section of their kind gives the objective (:mod:`fnn.train.generative`)::

    model: {name: dcgan_generator, latent_features: 32, ...}
    gan:
      discriminator: {name: dcgan_discriminator, spectral_norm: true, ...}
      loss: non_saturating                 # or hinge
      optimizer: {name: adam, ...}         # the discriminator's (default: the optimizer's)

    model: {name: unet, num_classes: 10, ...}        # num_classes: class conditional
    diffusion:
      noise_schedule: cosine               # or linear
      timesteps: 1000
      ema_decay: 0.999                     # of the weights the samples use
      label_dropout: 0.1                   # null labels, for classifier-free guidance
      sample_steps: 50                     # DDIM steps of the samples at each evaluation
                                           # (null: ancestral sampling through every step)
      guidance: 2.0                        # their classifier-free guidance scale

Each evaluation of a generative run writes a grid of samples to ``samples/`` in the run
directory; ``fnn sample RUN_DIR`` draws more.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping

import optax

from fnn.app.values import ConfigError, check_arguments, check_value, load_yaml
from fnn.layers.augment import (Cutout, GaussianNoise, RandomCrop, RandomFlip, RandomTranslate,
                                cutmix, mixup)
from fnn.losses import LOSSES
from fnn.diffusion import SCHEDULES as NOISE_SCHEDULES
from fnn.losses import GAN_LOSSES
from fnn.models import (GPT, MLP, CharLSTM, DCGANDiscriminator, DCGANGenerator, LeNet, ResNet,
                        TransformerClassifier, UNet, ViT)
from fnn.train.parallel import MODES

__all__ = ["Config", "ConfigError", "parse_config", "load_config", "build_model",
           "build_optimizer", "build_schedule", "build_loss", "build_mix", "MODELS", "MODEL_DATA",
           "OPTIMIZERS", "SCHEDULES", "PRECISIONS", "HOST_MALLOC", "DATASETS", "LANGUAGE_DATA"]

MODELS: dict[str, Callable] = {"mlp": MLP, "lenet": LeNet, "resnet": ResNet, "vit": ViT,
                               "charlstm": CharLSTM, "gpt": GPT,
                               "transformer_classifier": TransformerClassifier,
                               "dcgan_generator": DCGANGenerator, "unet": UNet}
# the models of a generative run and the config section that says how they train
GENERATIVE_MODELS = {"dcgan_generator": "gan", "unet": "diffusion"}
DISCRIMINATORS: dict[str, Callable] = {"dcgan_discriminator": DCGANDiscriminator}
_IMAGES = ("digits", "images", "arrays")
# the data each model trains on; the model arguments that the data fills in (never given in a
# config); and those it fills in when the config leaves them out (the number of classes)
MODEL_DATA: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "mlp": (_IMAGES + ("csv",), (), ("out_features",)),
    "lenet": (_IMAGES, (), ("num_classes",)), "resnet": (_IMAGES, (), ("num_classes",)),
    "vit": (_IMAGES, (), ("num_classes",)),
    "charlstm": (("text",), ("vocab_size",), ()), "gpt": (("text",), ("vocab_size",), ()),
    "transformer_classifier": (("text_classes",), ("vocab_size",), ("num_classes",)),
    "dcgan_generator": (_IMAGES, ("image_size", "channels"), ()),
    "unet": (_IMAGES, ("channels",), ()),
}
LANGUAGE_DATA = ("text",)  # next-character prediction; the rest is classification
AUGMENTATIONS: dict[str, Callable] = {
    "random_crop": RandomCrop, "random_translate": RandomTranslate, "random_flip": RandomFlip,
    "gaussian_noise": GaussianNoise, "cutout": Cutout,
}
MIXES: dict[str, Callable] = {"mixup": mixup, "cutmix": cutmix}
OPTIMIZERS: dict[str, Callable] = {
    "adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "rmsprop": optax.rmsprop,
    "lamb": optax.lamb, "lion": optax.lion, "adafactor": optax.adafactor,
}
SCHEDULES = {"constant": {"warmup_steps"}, "cosine": {"warmup_steps", "end_value"}}
PRECISIONS = ("float32", "bfloat16", "float16")  # presets of fnn.precision.Policy.parse
HOST_MALLOC = ("default", "tuned")  # tuned: fnn.app.runtime.tune_host_malloc, set by `fnn train`
# each data set's keys: required and optional
_SPLIT = {"test_path", "test_fraction"}
DATASETS = {"digits": ({"batch_size"}, set()),
            "text": ({"batch_size", "seq_len"}, {"path", "eval_batch_size"}),
            "arrays": ({"batch_size", "path"}, _SPLIT),
            "csv": ({"batch_size", "path", "label_column"}, _SPLIT),
            "images": ({"batch_size", "path", "size"}, _SPLIT | {"channels"}),
            "text_classes": ({"batch_size", "path", "seq_len"}, _SPLIT)}
_OPTIONAL = {"parallel": {"mode": "none", "devices": None, "mesh": None, "rules": None},
             "precision": "float32",
             "checkpoint": {"every": None, "keep": 3}, "eval_every": 1, "max_bad_steps": 10,
             "host_malloc": "default", "init": None, "augment": None, "mix": None,
             "loss": None, "gan": None, "diffusion": None}
GAN_OPTIONS = {"discriminator": None, "loss": "non_saturating", "optimizer": None}
DIFFUSION_OPTIONS = {"noise_schedule": "cosine", "timesteps": 1000, "ema_decay": 0.999,
                     "label_dropout": 0.1, "sample_steps": 50, "guidance": 2.0}
# keys of the optimizer section that are fnn's, not the optax optimizer's
GROUP_KEYS = ("frozen", "groups", "weight_decay_mask")
DECAY_MASKS = ("weights", "all")


@dataclasses.dataclass(frozen=True)
class Config:
    model: dict[str, Any]  # factory name and its keyword arguments
    data: dict[str, Any]  # data set name and batch_size
    optimizer: dict[str, Any]  # optax optimizer name and its keyword arguments
    schedule: dict[str, Any]  # learning-rate schedule over the whole run
    loss: dict[str, Any] | None  # loss name and its keyword arguments (None: generative)
    epochs: int  # passes over the training set
    seed: int  # initialisation, shuffling and dropout all derive from it
    output_dir: str  # where metrics.jsonl, plot.png and checkpoints/ are written
    # {"mode": one of MODES, "devices": int or None (all), "mesh": {axis: size} or None,
    #  "rules": {pattern: [axis or None, ...]} or None}
    parallel: dict[str, Any]
    precision: str  # float32 | bfloat16 | float16 (the compute dtype; params stay float32)
    checkpoint: dict[str, Any]  # {"every": steps or None (only at the end), "keep": K}
    eval_every: int  # epochs between evaluations (and history rows; and the last epoch's)
    max_bad_steps: int  # consecutive non-finite steps before the run stops
    host_malloc: str  # default | tuned (glibc keeps freed memory: big steps stop faulting)
    init: dict[str, Any] | None  # {"from": run dir, "take": patterns}: start from a run's params
    augment: list[dict[str, Any]] | None  # augmentation layers applied in training, in order
    mix: dict[str, Any] | None  # {"name": mixup | cutmix, "alpha": a}: batches mixed in training
    gan: dict[str, Any] | None  # a GAN run: its discriminator, loss and optimizer
    diffusion: dict[str, Any] | None  # a diffusion run: noise schedule, EMA, sampling


_TOP_LEVEL = {f.name: f.type for f in dataclasses.fields(Config)}
_REQUIRED = [key for key in _TOP_LEVEL if key not in _OPTIONAL]
_SCALARS = {"epochs": int, "seed": int, "output_dir": str, "precision": str,
            "eval_every": int, "max_bad_steps": int, "host_malloc": str}


def _unknown(where: str, key: str, allowed: set[str]) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(sorted(allowed))
    return ConfigError(f"unknown key {key!r} in {where}{hint} (allowed: {listing})")


def _check_keys(where: str, given: Mapping[str, Any], allowed: set[str]) -> None:
    for key in given:
        if key not in allowed:
            raise _unknown(where, key, allowed)


def _named_section(config: Mapping[str, Any], section: str, choices: Mapping[str, Any]
                   ) -> tuple[str, dict[str, Any]]:
    value = config[section]
    if not isinstance(value, Mapping) or "name" not in value:
        raise ConfigError(f"{section} must be a mapping with a 'name' (one of "
                          f"{', '.join(sorted(choices))}), got {value!r}")
    name = value["name"]
    if name not in choices:
        raise _unknown(f"{section}.name", str(name), set(choices))
    return name, {k: v for k, v in value.items() if k != "name"}


def _check_signature(where: str, fn: Callable, kwargs: Mapping[str, Any], skip=(),
                     optional=()) -> None:
    """``kwargs`` against ``fn``'s keyword arguments: none unknown (``skip``: not allowed),
    none missing (``optional``: may be left out, the data fills them in)."""
    params = inspect.signature(fn).parameters
    allowed = {name for name, p in params.items()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in skip}
    _check_keys(where, kwargs, allowed)
    missing = [name for name, p in params.items() if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and name not in kwargs and name not in skip and name not in optional]
    if missing:
        raise ConfigError(f"{where} is missing {', '.join(missing)}")


def _positive_or_none(where: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where} must be a positive int{' or null' if allow_none else ''}, "
                          f"got {value!r}")


def _options(section: str, value: Any, defaults: Mapping[str, Any],
             shorthand: str | None = None) -> dict[str, Any]:
    """A section of optional keys: a mapping checked against ``defaults`` (missing keys take
    the default), or a bare value for the ``shorthand`` key (``parallel: pmap``)."""
    if shorthand is not None and not isinstance(value, Mapping):
        value = {shorthand: value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{section} must be a mapping with keys {', '.join(defaults)}, got "
                          f"{value!r}")
    _check_keys(section, value, set(defaults))
    return dict(defaults) | dict(value)


def _check_layout(parallel: Mapping[str, Any]) -> None:
    """``parallel.mesh`` and ``parallel.rules``: only for fsdp and tensor, and well formed (the
    rules are checked against the model's parameters when the run starts)."""
    for key in ("mesh", "rules"):
        if parallel[key] is not None and parallel["mode"] not in ("fsdp", "tensor"):
            raise ConfigError(f"parallel.{key} is for the modes fsdp and tensor, which split "
                              f"the model; parallel.mode is {parallel['mode']}")
    mesh = parallel["mesh"]
    if mesh is not None:
        if not isinstance(mesh, Mapping) or not mesh:
            raise ConfigError(f"parallel.mesh must map axis names to sizes ({{data: 2, model: "
                              f"4}}), got {mesh!r}")
        for name, size in mesh.items():
            _positive_or_none(f"parallel.mesh.{name}", size, allow_none=False)
        if "data" not in mesh:
            raise ConfigError(f"parallel.mesh needs a data axis for the batch (data: 1 is "
                              f"fine), got {dict(mesh)}")
    rules = parallel["rules"]
    if rules is not None:
        if not isinstance(rules, Mapping):
            raise ConfigError(f"parallel.rules must map parameter patterns to lists of mesh "
                              f"axes ({{\"**/ffn/up/w\": [null, model]}}), got {rules!r}")
        for pattern, spec in rules.items():
            if not isinstance(spec, list) or not all(a is None or isinstance(a, str)
                                                     for a in spec):
                raise ConfigError(f"parallel.rules.{pattern} must be a list of mesh axis names "
                                  f"or null, one per trailing axis of the array, got {spec!r}")


def parse_config(raw: Any) -> Config:
    """Checks a config given as a mapping (e.g. loaded from YAML) and returns it."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    _check_keys("the config", raw, set(_TOP_LEVEL))
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ConfigError(f"the config is missing {', '.join(missing)}")
    raw = {key: raw.get(key, default) for key, default in _OPTIONAL.items()} | dict(raw)
    for key, kind in _SCALARS.items():
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ConfigError(f"{key} must be {kind.__name__}, got {raw[key]!r}")
    for key in ("epochs", "eval_every", "max_bad_steps"):
        if raw[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {raw[key]}")
    if raw["precision"] not in PRECISIONS:
        raise _unknown("precision", raw["precision"], set(PRECISIONS))
    if raw["host_malloc"] not in HOST_MALLOC:
        raise _unknown("host_malloc", raw["host_malloc"], set(HOST_MALLOC))
    parallel = _options("parallel", raw["parallel"], _OPTIONAL["parallel"], shorthand="mode")
    if parallel["mode"] not in MODES:
        raise _unknown("parallel.mode", str(parallel["mode"]), set(MODES))
    _positive_or_none("parallel.devices", parallel["devices"])
    if parallel["mode"] == "none" and (parallel["devices"] or 1) > 1:
        raise ConfigError(f"parallel.devices is {parallel['devices']} but parallel.mode is none "
                          f"(one device): give a mode, pmap or sharded (--parallel)")
    _check_layout(parallel)
    checkpoint = _options("checkpoint", raw["checkpoint"], _OPTIONAL["checkpoint"])
    _positive_or_none("checkpoint.every", checkpoint["every"])
    _positive_or_none("checkpoint.keep", checkpoint["keep"], allow_none=False)
    raw |= {"parallel": parallel, "checkpoint": checkpoint}

    model_name, model_kwargs = _named_section(raw, "model", MODELS)
    data_name, data_kwargs = _named_section(raw, "data", DATASETS)
    wanted_data, filled, _ = MODEL_DATA[model_name]
    if data_name not in wanted_data:
        kinds = " or ".join(repr(kind) for kind in wanted_data)
        raise ConfigError(f"model {model_name} trains on data {kinds}, got data {data_name!r}")
    for key in filled:
        if key in model_kwargs:
            raise ConfigError(f"model ({model_name}): {key} comes from the data; remove it")
    _check_signature(f"model ({model_name})", MODELS[model_name], model_kwargs, skip=filled,
                     optional=MODEL_DATA[model_name][2])
    check_arguments(f"model ({model_name})", MODELS[model_name], model_kwargs)
    _check_data(data_name, data_kwargs)
    _check_optimizer(raw)
    raw["init"] = _check_init(raw["init"])
    raw["augment"] = _check_augment(raw["augment"], data_name)
    schedule_name, schedule_kwargs = _named_section(raw, "schedule", SCHEDULES)
    _check_keys(f"schedule ({schedule_name})", schedule_kwargs, SCHEDULES[schedule_name])
    for key, kind in (("warmup_steps", "int"), ("end_value", "number")):
        if key in schedule_kwargs:
            check_value(f"schedule ({schedule_name})", key, schedule_kwargs[key], kind)
    kind = _run_kind(raw, model_name)
    if kind == "supervised":
        loss_name, loss_kwargs = _named_section(raw, "loss", LOSSES)
        _check_signature(f"loss ({loss_name})", LOSSES[loss_name], loss_kwargs,
                         skip=("logits", "labels", "predictions", "targets"))
        check_arguments(f"loss ({loss_name})", LOSSES[loss_name], loss_kwargs)
        raw["mix"] = _check_mix(raw["mix"], data_name, loss_name)
    else:
        _check_generative(raw, kind, model_name)
    config = Config(**{key: dict(raw[key]) if isinstance(raw[key], Mapping) else raw[key]
                       for key in _TOP_LEVEL})
    _check_model(config)
    return config


def _run_kind(raw: Mapping[str, Any], model_name: str) -> str:
    """``"supervised"``, ``"gan"`` or ``"diffusion"``: what the config's sections say, checked
    against its model (a generator needs its section, a classifier takes none)."""
    given = [kind for kind in ("gan", "diffusion") if raw[kind] is not None]
    if len(given) > 1:
        raise ConfigError("a config trains one kind of model: give gan or diffusion, not both")
    wanted = GENERATIVE_MODELS.get(model_name)
    kind = given[0] if given else None
    if wanted is not None and kind != wanted:
        raise ConfigError(f"model {model_name} is trained as a {wanted}: add a {wanted} section"
                          + ("" if kind is None else f" in place of {kind}"))
    if wanted is None and kind is not None:
        models = ", ".join(name for name, k in GENERATIVE_MODELS.items() if k == kind)
        raise ConfigError(f"a {kind} section needs a model made for it ({models}), got model "
                          f"{model_name}")
    if kind is None and raw["loss"] is None:
        raise ConfigError("the config is missing loss")
    return kind or "supervised"


def _check_generative(raw: dict[str, Any], kind: str, model_name: str) -> None:
    """The ``gan`` or ``diffusion`` section, checked and completed with its defaults in
    ``raw``; a generative run takes no ``loss``, ``mix``, ``augment`` or ``init``."""
    for key in GROUP_KEYS[:2]:
        if key in raw["optimizer"]:
            raise ConfigError(f"optimizer ({raw['optimizer']['name']}): {key} is for a "
                              f"classifier's parameters, not a {kind} run's")
    for key, what in (("loss", f"the {kind} section gives the objective"),
                      ("mix", "it mixes a classifier's labels"),
                      ("augment", "it augments a classifier's inputs"),
                      ("init", "a generative run starts from its own init")):
        if raw[key]:
            raise ConfigError(f"{key}: not for a {kind} run ({what}); remove it")
    if kind == "gan":
        section = _options("gan", raw["gan"], GAN_OPTIONS)
        if section["discriminator"] is None:
            raise ConfigError("gan is missing discriminator (a mapping with a name: "
                              f"{', '.join(DISCRIMINATORS)})")
        name, kwargs = _named_section(section, "discriminator", DISCRIMINATORS)
        where = f"gan.discriminator ({name})"
        for key in _FROM_IMAGES:
            if key in kwargs:
                raise ConfigError(f"{where}: {key} comes from the data; remove it")
        _check_signature(where, DISCRIMINATORS[name], kwargs, skip=_FROM_IMAGES)
        check_arguments(where, DISCRIMINATORS[name], kwargs)
        try:
            DISCRIMINATORS[name](**kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
        if section["loss"] not in GAN_LOSSES:
            raise _unknown("gan.loss", str(section["loss"]), set(GAN_LOSSES))
        if section["optimizer"] is not None:
            checked = {"optimizer": section["optimizer"]}
            try:
                _check_optimizer(checked)
            except ConfigError as e:
                raise ConfigError(f"gan: {e}") from None
            for key in GROUP_KEYS[:2]:
                if key in checked["optimizer"]:
                    raise ConfigError(f"gan.optimizer: {key} is not for a GAN's discriminator")
            section["optimizer"] = dict(checked["optimizer"])
        section["discriminator"] = dict(section["discriminator"])
        raw["gan"] = section
        return
    given = raw["diffusion"] if isinstance(raw["diffusion"], Mapping) else {}
    section = _options("diffusion", raw["diffusion"], DIFFUSION_OPTIONS)
    if section["noise_schedule"] not in NOISE_SCHEDULES:
        raise _unknown("diffusion.noise_schedule", str(section["noise_schedule"]),
                       set(NOISE_SCHEDULES))
    steps = section["timesteps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ConfigError(f"diffusion.timesteps must be an int >= 2, got {steps!r}")
    try:
        NOISE_SCHEDULES[section["noise_schedule"]](steps)
    except ValueError as e:
        raise ConfigError(f"diffusion: timesteps {steps} with the {section['noise_schedule']} "
                          f"schedule: {e}") from None
    if "sample_steps" not in given:  # the default, as many as there are
        section["sample_steps"] = min(DIFFUSION_OPTIONS["sample_steps"], steps)
    for key in ("ema_decay", "label_dropout"):
        check_value("diffusion", key, section[key], "number")
        if not 0 <= section[key] < 1:
            raise ConfigError(f"diffusion.{key} must be in [0, 1), got {section[key]!r}")
    sample_steps = section["sample_steps"]
    if sample_steps is not None:
        _positive_or_none("diffusion.sample_steps", sample_steps)
        if sample_steps > steps:
            raise ConfigError(f"diffusion.sample_steps ({sample_steps}) must be at most the "
                              f"timesteps ({steps}); null samples through every step")
    check_value("diffusion", "guidance", section["guidance"], "number")
    if not section["guidance"] >= 0:
        raise ConfigError(f"diffusion.guidance must be >= 0, got {section['guidance']!r}")
    if raw["model"].get("num_classes") is None:  # nothing to guide towards, no label to drop
        for key, off in (("guidance", 1.0), ("label_dropout", 0.0)):
            if key in given and given[key] != off:
                raise ConfigError(f"diffusion.{key} is for a class-conditional model (give "
                                  f"model.num_classes); an unconditional one takes {off}")
            section[key] = off
    raw["diffusion"] = section


def run_kind(config: Config) -> str:
    """``"supervised"``, ``"gan"`` or ``"diffusion"``."""
    return "gan" if config.gan else "diffusion" if config.diffusion else "supervised"


def _check_data(name: str, kwargs: Mapping[str, Any]) -> None:
    required, optional = DATASETS[name]
    _check_keys(f"data ({name})", kwargs, required | optional)
    for key in sorted(required):
        if key not in kwargs:
            raise ConfigError(f"data ({name}) is missing {key}")
    for key in ("batch_size", "seq_len", "eval_batch_size"):
        if key in kwargs:
            _positive_or_none(f"data.{key}", kwargs[key], allow_none=False)
    for key in ("path", "test_path"):
        if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
            raise ConfigError(f"data.{key} must be a file path, got {kwargs[key]!r}")
    if "test_path" in kwargs and "test_fraction" in kwargs:
        raise ConfigError("data: give test_path (a test set of its own) or test_fraction (a "
                          "fixed part of path), not both")
    fraction = kwargs.get("test_fraction")
    if fraction is not None:
        check_value(f"data ({name})", "test_fraction", fraction, "number")
        if not 0 < fraction < 1:
            raise ConfigError(f"data ({name}): test_fraction must be in (0, 1), got {fraction!r}")
    label = kwargs.get("label_column")
    if "label_column" in kwargs and (not isinstance(label, (str, int)) or isinstance(label, bool)):
        raise ConfigError(f"data ({name}): label_column must be a column name or index, got "
                          f"{label!r}")
    size = kwargs.get("size")
    if "size" in kwargs and not (
            (isinstance(size, int) and not isinstance(size, bool) and size > 0)
            or (isinstance(size, list) and len(size) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size))):
        raise ConfigError(f"data ({name}): size must be a positive int or [height, width], got "
                          f"{size!r}")
    channels = kwargs.get("channels", 3)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels not in (1, 3):
        raise ConfigError(f"data ({name}): channels must be 1 (grayscale) or 3 (RGB), got "
                          f"{kwargs['channels']!r}")


def _patterns(where: str, value: Any) -> list[str]:
    """A list of parameter patterns (a single string counts as a list of one)."""
    listed = [value] if isinstance(value, str) else value
    if not isinstance(listed, list) or not listed or not all(
            isinstance(p, str) and p and not p.startswith("/") for p in listed):
        raise ConfigError(f"{where} must be a list of parameter patterns such as trunk/** or "
                          f"**/b, got {value!r}")
    return listed


def _check_optimizer(raw: dict[str, Any]) -> None:
    name, kwargs = _named_section(raw, "optimizer", OPTIMIZERS)
    where, fn = f"optimizer ({name})", OPTIMIZERS[name]
    plain = {k: v for k, v in kwargs.items() if k not in GROUP_KEYS}
    _check_signature(where, fn, plain, skip=("mask",))
    if "learning_rate" not in plain:  # the schedule is built from it
        raise ConfigError(f"{where} is missing learning_rate")
    check_arguments(where, fn, plain)
    check_value(where, "learning_rate", plain["learning_rate"], "number")
    if "frozen" in kwargs:
        _patterns(f"{where}: frozen", kwargs["frozen"])
    if "mask" in inspect.signature(fn).parameters:  # written out: config.yaml says which
        raw["optimizer"] = dict(raw["optimizer"]) | {
            "weight_decay_mask": kwargs.get("weight_decay_mask", "weights")}
    if "weight_decay_mask" in kwargs:
        if "mask" not in inspect.signature(fn).parameters:
            raise ConfigError(f"{where}: weight_decay_mask is for optimizers with weight decay "
                              f"and a mask ({', '.join(_decaying())}), not {name}")
        if kwargs["weight_decay_mask"] not in DECAY_MASKS:
            raise ConfigError(f"{where}: weight_decay_mask must be one of "
                              f"{', '.join(DECAY_MASKS)}, got {kwargs['weight_decay_mask']!r}")
    groups = kwargs.get("groups", [])
    if not isinstance(groups, list):
        raise ConfigError(f"{where}: groups must be a list of mappings with params (patterns) "
                          f"and optimizer arguments, got {groups!r}")
    for index, group in enumerate(groups):
        at = f"{where}: groups[{index}]"
        if not isinstance(group, Mapping) or "params" not in group:
            raise ConfigError(f"{at} must be a mapping with params (patterns) and optimizer "
                              f"arguments, got {group!r}")
        _patterns(f"{at}.params", group["params"])
        arguments = {k: v for k, v in group.items() if k != "params"}
        _check_keys(at, arguments, {k for k in inspect.signature(fn).parameters
                                    if k != "mask"})
        check_arguments(at, fn, arguments)


def _decaying() -> list[str]:
    """The optimizers that take a weight-decay mask."""
    return [name for name, fn in OPTIMIZERS.items() if "mask" in inspect.signature(fn).parameters]


def _check_augment(value: Any, data_name: str) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"augment must be a list of mappings with a name (one of "
                          f"{', '.join(AUGMENTATIONS)}), got {value!r}")
    if value and data_name not in _IMAGES:
        raise ConfigError(f"augment works on image batches (data {', '.join(_IMAGES)}), got data "
                          f"{data_name!r}")
    for index, entry in enumerate(value):
        name, kwargs = _named_section({"augment": entry}, "augment", AUGMENTATIONS)
        where = f"augment[{index}] ({name})"
        _check_signature(where, AUGMENTATIONS[name], kwargs)
        check_arguments(where, AUGMENTATIONS[name], kwargs)
        try:
            AUGMENTATIONS[name](**kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return [dict(entry) for entry in value]


def _check_mix(value: Any, data_name: str, loss_name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    name, kwargs = _named_section({"mix": value}, "mix", MIXES)
    _check_keys(f"mix ({name})", kwargs, {"alpha"})
    if "alpha" not in kwargs:
        raise ConfigError(f"mix ({name}) is missing alpha (the Beta(alpha, alpha) of the mixing "
                          f"share, e.g. 0.2)")
    check_value(f"mix ({name})", "alpha", kwargs["alpha"], "number")
    if not kwargs["alpha"] > 0:
        raise ConfigError(f"mix ({name}): alpha must be a number > 0, got {kwargs['alpha']!r}")
    kinds = _IMAGES if name == "cutmix" else _IMAGES + ("csv",)
    if data_name not in kinds:
        raise ConfigError(f"mix ({name}) mixes {'images' if name == 'cutmix' else 'inputs'} "
                          f"of a classification (data {', '.join(kinds)}), got data "
                          f"{data_name!r}")
    if loss_name != "softmax_cross_entropy":
        raise ConfigError(f"mix ({name}) gives soft labels, which softmax_cross_entropy takes; "
                          f"the loss is {loss_name}")
    return {"name": name, "alpha": kwargs["alpha"]}


def build_mix(config: Config, num_classes: int):
    """The config's batch mix, ``(key, x, labels) -> (x, soft_labels)``, or None."""
    if config.mix is None:
        return None
    fn, alpha = MIXES[config.mix["name"]], config.mix["alpha"]
    return lambda key, x, labels: fn(key, x, labels, num_classes, alpha=alpha)


def _check_init(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or "from" not in value:
        raise ConfigError(f"init must be a mapping with from (a run directory) and take "
                          f"(patterns, optional), got {value!r}")
    _check_keys("init", value, {"from", "take"})
    if not isinstance(value["from"], str) or not value["from"]:
        raise ConfigError(f"init.from must be the directory of an fnn train run, got "
                          f"{value['from']!r}")
    return {"from": value["from"], "take": _patterns("init.take", value.get("take", ["**"]))}


_STAND_INS = {"image_size": 8, "channels": 1}  # filled in by the data, to check a model early
_FROM_IMAGES = ("image_size", "channels")  # what a generative model's data says of its images


def _check_model(config: Config) -> None:
    """Builds the model (closures only: no JAX computation) so that its own checks of its
    hyper-parameters run now, and checks the data's windows against its ``max_length``."""
    name = config.model["name"]
    # stand-ins for what the data fills in
    filled = {key: _STAND_INS.get(key, 2) for key in MODEL_DATA[name][1] + MODEL_DATA[name][2]
              if key not in config.model}
    try:
        build_model(config, **filled)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model ({name}): {e}") from None
    params = inspect.signature(MODELS[name]).parameters
    if "max_length" in params and "seq_len" in config.data:
        max_length = config.model.get("max_length", params["max_length"].default)
        if config.data["seq_len"] > max_length:
            raise ConfigError(f"data.seq_len ({config.data['seq_len']}) must be at most the "
                              f"model's max_length ({max_length}): a window longer than the "
                              f"position table cannot be embedded")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Reads and checks a YAML config; ``overrides`` replace top-level scalars (e.g. epochs)."""
    import yaml

    if Path(path).is_dir():
        raise ConfigError(f"{path} is a directory, not a config file")
    text = Path(path).read_text(encoding="utf-8")
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if isinstance(raw, dict) and overrides:
        raw = _merge(raw, overrides)
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _merge(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """``raw`` with ``overrides``: a mapping given for a section (``parallel: {devices: 4}``)
    updates that section's keys rather than replacing it (a bare value, ``parallel: pmap``, is
    the section's shorthand and counts as a mapping of it)."""
    merged = dict(raw)
    for key, value in overrides.items():
        base = merged.get(key)
        if key == "parallel" and isinstance(base, str):
            base = {"mode": base}
        merged[key] = (dict(base) | dict(value) if isinstance(base, Mapping)
                       and isinstance(value, Mapping) else value)
    return merged


def build_schedule(config: Config, total_steps: int,
                   learning_rate: float | None = None) -> optax.Schedule:
    """The learning-rate schedule: ``optimizer.learning_rate`` (or ``learning_rate``, a
    group's) shaped by ``schedule``."""
    lr = config.optimizer["learning_rate"] if learning_rate is None else learning_rate
    kwargs = {k: v for k, v in config.schedule.items() if k != "name"}
    warmup = kwargs.get("warmup_steps", 0)
    if warmup >= total_steps:
        raise ConfigError(f"schedule.warmup_steps ({warmup}) must be less than the run's "
                          f"{total_steps} steps (epochs x batches per epoch)")
    if config.schedule["name"] == "constant":
        return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total_steps,
                                              kwargs.get("end_value", 0.0))


def build_optimizer(config: Config, total_steps: int,
                    section: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    """The optimizer over the whole run, with its parameter groups and weight-decay mask
    (``section``: another optimizer section than the config's, a GAN discriminator's)."""
    from fnn.train.groups import decay_mask, param_groups

    section = config.optimizer if section is None else section
    fn = OPTIMIZERS[section["name"]]
    base = {k: v for k, v in section.items() if k not in ("name", "learning_rate", *GROUP_KEYS)}
    if "mask" in inspect.signature(fn).parameters and section.get(
            "weight_decay_mask", "weights") == "weights":
        base["mask"] = decay_mask

    def make(arguments: Mapping[str, Any]) -> optax.GradientTransformation:
        kwargs = base | {k: v for k, v in arguments.items() if k not in ("params",
                                                                          "learning_rate")}
        return fn(build_schedule(config, total_steps,
                                 arguments.get("learning_rate", section["learning_rate"])),
                  **kwargs)

    groups = section.get("groups", [])
    if not groups and "frozen" not in section:
        return make({})
    return param_groups(make({}), frozen=section.get("frozen", ()),
                        groups=[(group["params"], make(group)) for group in groups])


def _augmented(augment: list, model):
    """``model`` with the ``augment`` layers applied before it in training; its params and state
    are the model's own (so the param paths do not change with the config's augmentation)."""
    import jax

    from fnn.combinators import serial
    from fnn.core import Layer

    pipeline = serial(*augment)

    def apply(params, state, x, *, key=None, train=False):
        if not train:
            return model.apply(params, state, x, key=key, train=False)
        augment_key, model_key = (None, None) if key is None else jax.random.split(key)
        x, _ = pipeline.apply(pipeline.init(jax.random.key(0), x)[0], {}, x, key=augment_key,
                              train=True)
        return model.apply(params, state, x, key=model_key, train=True)

    return Layer(model.init, apply, model.name)


def build_model(config: Config, **filled: Any):
    """The config's model, wrapped in its precision policy. ``filled``: the arguments that come
    from the data (``vocab_size``). (Under ``parallel: pmap`` fnn's data-parallel step makes
    BatchNorm average its statistics over the devices, as in Python.)"""
    from fnn.precision import Policy, with_policy

    name = config.model["name"]
    kwargs = {k: v for k, v in config.model.items() if k != "name"} | filled
    model = MODELS[name](**kwargs)
    if config.augment:
        model = _augmented([AUGMENTATIONS[a["name"]](**{k: v for k, v in a.items()
                                                         if k != "name"})
                            for a in config.augment], model)
    return model if config.precision == "float32" else with_policy(
        model, Policy.parse(config.precision))


def build_discriminator(config: Config, **filled: Any):
    """A GAN config's discriminator, in the run's precision policy; ``filled``: what the data
    says of the images (``image_size``, ``channels``), given where the factory takes it."""
    from fnn.precision import Policy, with_policy

    factory = DISCRIMINATORS[config.gan["discriminator"]["name"]]
    takes = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in config.gan["discriminator"].items() if k != "name"}
    model = factory(**kwargs, **{k: v for k, v in filled.items() if k in takes})
    return model if config.precision == "float32" else with_policy(
        model, Policy.parse(config.precision))


def build_loss(config: Config):
    kwargs = {k: v for k, v in config.loss.items() if k != "name"}
    fn = LOSSES[config.loss["name"]]
    return lambda outputs, targets: fn(outputs, targets, **kwargs)
