"""Every option of a fit, written once: the dataclasses the library and the CLI both read.

:class:`FitConfig` holds what both modes share (head, loss, schedule, validation, run
files); :class:`EndToEndConfig` what only a fit on audio needs (backbone, crops, workers,
unfreezing). This module imports no torch: the CLI reads it to build its options.
:func:`make_configs` is the one option-check path of both modes: unknown
names and every out-of-range value are refused with a one-line :class:`FitError` naming the
option and its valid range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mrlcache import components, names
from mrlcache.streams import POOLED_ONLY, pooled_only
from mrlcache.ranges import (COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SEED, SECONDS, Range, bounded,
                             check_choices, check_fields, choice)


class FitError(ValueError):
    """Options or inputs a fit cannot run with; the message names the fix."""


MARGIN_DEFAULT = 0.2  # FitConfig.margin's default: --margins may replace it
MARGIN = Range(lo=0, hi=1.5, unit="radians")  # beyond pi/2 the target logit is no longer the largest
LEARNING_RATE = Range(lo=0, hi=10, lo_open=True)
SHUFFLE_GB = 64.0  # RunOptions.shuffle_gb's default: a VoxCeleb2 pooled cache (30 GB) is one group


@dataclass
class HeadOptions:
    """What is fitted: the head, its sizes and inputs, and how it starts."""

    dims: tuple[int, ...] = bounded((64, 128, 192, 256), COUNT)
    name: str = choice("mrl", names.HEADS, key="head")  # --head: a name in mrlcache.models.HEADS
    inputs: tuple[str, ...] = POOLED_ONLY  # cached streams the head reads (mrlcache.streams names)
    fusion: str | None = choice(None, names.FUSIONS)  # needed when inputs make several encoders
    encoder_dim: int = bounded(256, COUNT)  # width of the layer / handcrafted encoders and of the fusion
    ecapa_channels: int = bounded(512, COUNT)  # ECAPA-TDNN block width (--head ecapa)
    ecapa_scale: int = bounded(8, COUNT)  # Res2 groups; divides ecapa_channels
    ecapa_mfa_channels: int = bounded(1536, COUNT)  # width after multi-layer aggregation
    ecapa_bottleneck: int = bounded(128, COUNT)  # hidden width of the SE and pooling attention
    # Nested dims from the encoder's own embedding (mrlcache.fit.adaptor): the head's start,
    # the rotation that orders the published dims, and the objective (margin: a head trained by
    # the margin loss; adaptor: a rotation (+ residual MLP) of the published embedding trained to
    # preserve its similarities, no labels; adaptor-supervised: that plus the margin loss).
    # init auto: published on imported vectors and trained encoders' caches (measured, benchmarks/README.md)
    init: str = choice("auto", names.INITS)  # auto | random | published (cache mode, a head on pooled)
    init_rotation: str = choice("auto", names.INIT_ROTATIONS)  # auto (each scored at epoch 0) | pca | lda | whitened
    init_center: bool = False  # start from the published embedding minus its training mean (default: as it is)
    objective: str = choice("margin", names.OBJECTIVES)  # margin | adaptor | adaptor-supervised
    adaptor_hidden: int = bounded(0, NON_NEGATIVE_INT)  # residual MLP width of the adaptor; 0: rotation only
    adaptor_topk: int = bounded(10, COUNT)  # nearest neighbours per row in the adaptor's top-k term


@dataclass
class LossOptions:
    """The margin loss every head trains with (mrlcache.fit.losses) and its margin warm-up."""

    name: str = choice("aam", names.LOSSES, key="loss")  # --loss
    margin: float = bounded(MARGIN_DEFAULT, MARGIN)
    margins: tuple[float, ...] | None = bounded(None, MARGIN, many=True)  # one per dim (replaces margin; warmed up)
    scale: float = bounded(32.0, Range(lo=0, hi=1000, lo_open=True))
    margin_warmup_epochs: int = bounded(5, NON_NEGATIVE_INT)  # margin grows linearly from 0 over these epochs
    subcenters: int = bounded(1, COUNT)
    classifier: str = choice("shared", names.CLASSIFIERS)
    class_sample: float = bounded(1.0, Range(lo=0, hi=1, lo_open=True))  # share of classes per step; 1: all
    dim_weights: tuple[float, ...] | None = bounded(None, NON_NEGATIVE, many=True)
    grad_scaling: bool = False  # scale each coordinate's gradient by 1 / (number of dims holding it)


@dataclass
class OptimOptions:
    """The optimiser, the learning-rate schedule and the length of the fit."""

    optimizer: str = choice("adamw", names.OPTIMIZERS)
    lr: float = bounded(2e-3, LEARNING_RATE)
    momentum: float = bounded(0.9, Range(lo=0, hi=1, hi_open=True))  # sgd only
    weight_decay: float = bounded(1e-2, Range(lo=0, hi=10))
    scheduler: str = choice("cosine", names.SCHEDULERS)  # cosine (per step, linear warm-up) | plateau (val EER)
    warmup_epochs: float = bounded(1.0, NON_NEGATIVE)
    grad_clip: float = bounded(5.0, NON_NEGATIVE)  # max gradient norm; 0 disables
    epochs: int = bounded(30, COUNT)
    batch_size: int = bounded(256, Range(lo=2, integer=True))  # BatchNorm needs two rows


@dataclass
class ValOptions:
    """Validation (model selection by mean EER) and early stopping."""

    val_cache: str | None = None
    val_trials: str | None = None
    val_speakers: int | None = bounded(None, NON_NEGATIVE_INT)  # None: 5% of speakers, 2..200; 0: none
    val_every: int = bounded(1, COUNT)
    max_val_trials: int = bounded(50000, COUNT)
    patience: int = bounded(0, NON_NEGATIVE_INT)  # epochs without a better mean EER before stopping; 0: never
    min_delta: float = bounded(0.0, Range(lo=0, hi=1))  # an EER fraction, e.g. 0.001 (1: no epoch improves)


@dataclass
class RunOptions:
    """How the fit runs and what it writes, beside what it fits."""

    seed: int = bounded(0, SEED)
    device: str = choice("auto", names.DEVICES)
    precision: str = choice("fp32", names.FIT_PRECISIONS)  # bf16: CPU autocast; CUDA: fp16 AMP
    feature_dtype: str = choice("float16", names.DTYPES)  # in-memory feature dtype (cache mode)
    memory_gb: float | None = bounded(None, POSITIVE)  # None: half the available memory (cache mode)
    # Rows permuted together each epoch: a cache whose features (every view, feature_dtype) fit
    # this is one group (one permutation of all rows). A setting of the data: the order depends
    # on the seed and this, never on memory_gb (mrlcache.fit.data).
    shuffle_gb: float = bounded(SHUFFLE_GB, POSITIVE)
    fixed_baselines: bool = False  # also fit one fixed-size head per dim, into RUN/fixed/D (cache mode)
    embed_backbone: bool = True
    weights: str | None = None  # backbone file (cache mode: when the cache does not carry it)
    head_only: bool = False  # model.pt without a backbone (vectors from no known backbone)
    progress: bool = True
    dist_timeout: float = bounded(1800.0, POSITIVE)  # torchrun: seconds a rank waits for the others, then stops


@dataclass
class FitConfig:
    """Every option both modes share, by component; the flat keys (:mod:`mrlcache.components`)
    are the ``mrlcache fit`` options."""

    head: HeadOptions = field(default_factory=HeadOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    val: ValOptions = field(default_factory=ValOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def check(self) -> None:
        """Raise FitError for an option value no fit can use."""
        from mrlcache.models.matryoshka import check_dims

        head, loss = self.head, self.loss
        try:
            head.dims = check_dims(head.dims)
        except ValueError as err:
            raise FitError(str(err)) from None
        from mrlcache.models import STARTED_HEADS

        if head.name in STARTED_HEADS:
            raise FitError(f"--head {head.name}: this head starts from the encoder's published embedding; "
                           "fit it with --init published (warm) or --objective adaptor (adaptor), --head mrl")
        self._check_inputs()
        check_choices(self, FitError)
        check_fields(self, FitError)
        if loss.dim_weights is not None:
            weights = list(loss.dim_weights)
            if len(weights) != len(head.dims):
                raise FitError(f"dim_weights {weights}: give one weight per dim in {list(head.dims)}")
            if sum(weights) <= 0:
                raise FitError(f"--dim-weights {','.join(map(str, weights))}: must be >= 0 each, not all zero")
        self._check_margins()
        self._check_head_supports()
        if (self.val.val_cache is None) != (self.val.val_trials is None):
            raise FitError("validation needs both --val-cache DIR and --val-trials FILE (or neither)")
        if self.optim.scheduler == "plateau" and self.val.val_speakers == 0 and self.val.val_cache is None:
            raise FitError("scheduler=plateau steps on the validation EER: do not disable validation")

    @property
    def starts_from_published(self) -> bool:
        """A head started from the encoder's published embedding (warm start or adaptor)."""
        return self.head.init == "published" or self.head.objective != "margin"

    def _check_margins(self) -> None:
        """--margins: one per dim, each a margin; the largest becomes margin."""
        loss, dims = self.loss, self.head.dims
        if loss.margins is None:
            return
        margins = [float(m) for m in loss.margins]
        text = ",".join(map(str, margins))
        if len(margins) != len(dims):
            raise FitError(f"--margins {text}: give one margin per dim in {list(dims)} "
                           f"({len(dims)} values, not {len(margins)})")
        if loss.margin not in (MARGIN_DEFAULT, max(margins)):
            raise FitError(f"--margin {loss.margin} and --margins {text}: give one of them "
                           "(--margins sets the largest margin)")
        loss.margins, loss.margin = tuple(margins), max(margins)

    def _check_head_supports(self) -> None:
        """Options only some heads take (mrlcache.models.HEAD_SUPPORTS), and the inputs they need."""
        from mrlcache.models import HEAD_SUPPORTS, head_supports

        head = self.head
        asked = {"margins": ("--margins", self.loss.margins is not None),
                 "grad_scaling": ("--grad-scaling", self.loss.grad_scaling),
                 "fixed_baselines": ("--fixed-baselines", self.run.fixed_baselines),
                 "published_start": (f"--init {head.init} --objective {head.objective}", self.starts_from_published)}
        refused = [name for name, (_, given) in asked.items() if given and name not in head_supports(head.name)]
        if refused:
            takers = [h for h, names in HEAD_SUPPORTS.items() if set(refused) <= set(names)]
            raise FitError(f"{', '.join(asked[n][0] for n in refused)}: not an option of --head {head.name}; "
                           f"use --head {' or '.join(takers) or '(no head takes them all)'}")
        if self.starts_from_published and not pooled_only(head.inputs):
            raise FitError(f"--init {head.init} --objective {head.objective}: start from the published "
                           f"embedding on --inputs pooled, not {','.join(head.inputs)}")
        if self.run.fixed_baselines and not pooled_only(head.inputs):
            raise FitError(f"--fixed-baselines fits fixed-size heads on the pooled vector only; with --inputs "
                           f"{','.join(head.inputs)} none would be fitted: drop it")

    def _check_inputs(self) -> None:
        """--inputs names known streams, once each; --fusion a known fusion (the geometry is
        checked against the cache by mrlcache.models.streams)."""
        from mrlcache.names import STREAMS

        head = self.head
        if isinstance(head.inputs, str):
            head.inputs = tuple(s.strip() for s in head.inputs.split(",") if s.strip())
        head.inputs = tuple(head.inputs)
        if not head.inputs:
            raise FitError("--inputs: give at least one cached stream, e.g. pooled or layers,fbank,f0")
        unknown = [s for s in head.inputs if s not in STREAMS]
        if unknown:
            raise FitError(f"--inputs {','.join(head.inputs)}: unknown stream {unknown[0]!r}; "
                           f"use names of {', '.join(STREAMS)}")
        if len(set(head.inputs)) != len(head.inputs):
            raise FitError(f"--inputs {','.join(head.inputs)}: a stream is listed twice")

    def to_dict(self) -> dict:
        """Plain YAML/JSON-ready nested dict ({group: {field: value}}, tuples as lists)."""
        return components.nested(self)


@dataclass
class EndToEndConfig:
    """Options of a fit on audio (``mrlcache fit --end-to-end``), beside a FitConfig."""

    data: str | None = None  # VoxCeleb-style audio tree
    variant: str | None = None  # published ReDimNet name (b0..b6, S, M)
    random_init: bool = False  # the variant with random weights from the seed
    train_type: str = "ptn"
    dataset: str = "vox2"
    crop_seconds: float = bounded(2.0, SECONDS)
    min_seconds: float = bounded(0.5, Range(lo=0, unit="seconds"))  # shorter files are left out, as extract
    views: int = bounded(4, COUNT)  # views per utterance, drawn as extract draws them
    augment: Any = None  # mrlcache.augment.AugmentConfig, or None (clean crops)
    workers: int = bounded(2, NON_NEGATIVE_INT)  # DataLoader workers decoding and augmenting
    unfreeze_after: int | None = bounded(None, NON_NEGATIVE_INT)  # backbone trains from this epoch; None: frozen
    backbone_lr: float = bounded(1e-5, LEARNING_RATE)
    grad_accum: int = bounded(1, COUNT)  # batches per optimiser step

    def check(self, weights: str | None) -> None:
        """Raise FitError for a value no end-to-end fit can use (``weights``: FitConfig.weights)."""
        check_fields(self, FitError)
        if sum(bool(x) for x in (self.variant, weights)) != 1:
            raise FitError("end-to-end mode needs exactly one of --variant NAME or --weights PATH")

    def identity(self, weights: str | None) -> dict:
        """What makes one end-to-end fit's data: part of its fingerprint (workers are not)."""
        return {"mode": "end-to-end", "data": str(self.data), "variant": self.variant, "weights": weights,
                "random_init": self.random_init, "train_type": self.train_type, "dataset": self.dataset,
                "crop_seconds": self.crop_seconds, "views": self.views,
                "augment": self.augment.to_dict() if self.augment is not None else None,
                "unfreeze_after": self.unfreeze_after, "backbone_lr": self.backbone_lr,
                "grad_accum": self.grad_accum, "min_seconds": self.min_seconds}

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["augment"] = self.augment.to_dict() if self.augment is not None else None
        return d


def field_names(cls) -> set[str]:
    """The flat option names of a config class (:func:`mrlcache.components.leaves`)."""
    return set(components.leaves(cls))


def flat_options(data: dict) -> dict:
    """A fit's options, nested (``{"optim": {"lr": ...}}``, this version's config.yaml) or flat
    (earlier versions' config.yaml and ``--config`` files), as flat keys: the one conversion."""
    return components.flatten(FitConfig, data, FitError)


def make_configs(dims, options: dict, end_to_end: bool = False):
    """The checked configs of one fit: (FitConfig, EndToEndConfig or None).

    ``options``: any option of FitConfig (and, end to end, of EndToEndConfig) by its flat
    key (``lr``, ``head``) or nested by group; anything else is refused, so a typo never
    passes silently.
    """
    options = flat_options(options)
    fit_names = field_names(FitConfig)
    e2e_names = field_names(EndToEndConfig) if end_to_end else set()
    unknown = sorted(set(options) - fit_names - e2e_names)
    if unknown:
        raise FitError(f"unknown fit option(s): {', '.join(unknown)}")
    cfg = components.build(FitConfig, {**{k: v for k, v in options.items() if k in fit_names}, "dims": tuple(dims)})
    cfg.check()
    if not end_to_end:
        return cfg, None
    if cfg.starts_from_published:
        raise FitError(f"--init {cfg.head.init} --objective {cfg.head.objective}: a start from the published "
                       "embedding is fitted on a cache (--cache), not end to end")
    from mrlcache.models import head_class

    if not pooled_only(cfg.head.inputs) or head_class(cfg.head.name).reads != "vector":
        raise FitError(f"--inputs {','.join(cfg.head.inputs)} --head {cfg.head.name}: end to end trains a head on "
                       "the pooled vector only; fit other inputs and heads on a cache (--cache)")
    e2e = EndToEndConfig(**{k: v for k, v in options.items() if k in e2e_names})
    e2e.check(cfg.run.weights)
    if cfg.run.fixed_baselines:
        raise FitError("--fixed-baselines trains on a cache (the heads share its vectors); "
                       "drop it with --end-to-end")
    if cfg.val.val_cache is not None:
        raise FitError("end-to-end mode validates on held-out training speakers: use --val-speakers, "
                       "not --val-cache (cached vectors go stale once the backbone trains)")
    return cfg, e2e


def device_for(cfg):
    """The device of ``cfg.run.device`` (runtime's rule), with fit's error type."""
    from mrlcache.runtime import DeviceError, resolve_device

    try:
        return resolve_device(cfg.run.device)
    except DeviceError as err:
        raise FitError(str(err)) from None
