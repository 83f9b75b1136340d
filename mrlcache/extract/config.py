"""What an extraction is asked to do: :class:`ExtractConfig` (every setting the cached
vectors depend on, plus how the pass is run) and its error type."""

from __future__ import annotations

from dataclasses import dataclass, field

from mrlcache import components, names
from mrlcache.streams import pooled_only
from mrlcache.ranges import (CAP_SECONDS, COUNT, DEFAULT_WINDOW_SECONDS, NON_NEGATIVE_INT, SECONDS, SEED,
                             WINDOW_SECONDS, bounded, check_choices, check_fields, choice)


def _no_augment_settings() -> "AugmentConfig":
    from mrlcache.augment import AugmentConfig  # numpy and the audio stack: not for --help

    return AugmentConfig()


class ExtractError(Exception):
    """Settings that cannot work (bad device/precision, nothing to extract...)."""


@dataclass
class BackboneOptions:
    """The frozen encoder (or pretrained speech model) and what runs it.

    ``variant``: a published ReDimNet (b0..b6, S, M), or with ``random_init`` a configuration
    of ``name``; ``weights``: a local weights file or folder instead (exactly one of the two
    when a stream needs the backbone); ``name``: the encoder (None: told by the weights,
    ReDimNet for a variant); ``train_type``/``dataset``: which published file. ``ptm``: a
    model whose 13 hidden states are the ``layers`` stream (``ptm_weights``: its local
    state_dict). ``engine`` (:mod:`mrlcache.engines`): torch; fused (ReDimNet with BatchNorm
    folded, channels-last); onnxruntime (the backbone exported to ONNX, CPU, pooled only);
    auto (chosen in extract: for a pooled-only float32 job on the CPU the engine measured
    fastest for the encoder, else torch). The engine used is recorded in cache.json (vectors
    of any but torch within ~1e-5 of torch's, not bit-equal). ``precision``: auto
    (bf16/fp16 autocast on CUDA, fp32 on the CPU), fp32, bf16, fp16.
    """

    name: str | None = choice(None, names.BACKBONES, key="backbone")
    variant: str | None = None
    weights: str | None = None
    random_init: bool = False  # random weights from the seed (a ReDimNet is saved as OUT/backbone.pt)
    train_type: str = "ptn"
    dataset: str = "vox2"
    ptm: str | None = choice(None, names.PTMS)
    ptm_weights: str | None = None
    engine: str = choice("torch", names.ENGINES)
    precision: str = choice("auto", names.PRECISIONS)


@dataclass
class ViewOptions:
    """What is cut from each utterance: ``count`` crops (train; view 0 clean, the others
    augmented) or the whole utterance (eval, one view, computed window by window beyond
    ``window_seconds``: :mod:`mrlcache.streams.windows`; None: one pass, memory growing with length)."""

    mode: str = choice("train", names.MODES)
    count: int = bounded(4, COUNT, key="views")  # --views: crops per utterance in train mode
    crop_seconds: float = bounded(2.0, SECONDS)  # train: shorter utterances are repeat-padded
    max_seconds: float | None = bounded(None, CAP_SECONDS)  # eval: keep at most this much (None: all)
    window_seconds: float | None = bounded(DEFAULT_WINDOW_SECONDS, WINDOW_SECONDS)
    min_seconds: float = bounded(0.5, SECONDS)  # shorter utterances are skipped as "too_short"
    augment: AugmentConfig = field(default_factory=_no_augment_settings)  # views 1..K-1


@dataclass
class StorageOptions:
    """What is stored and how: ``streams`` (comma-separated, :data:`mrlcache.streams.STREAMS`),
    ``layers_pooled`` (per-layer mean and std over time instead of the layer frames), every
    stream in ``dtype``, ``shard_size`` utterances per shard, shard files in ``format``."""

    streams: str = "pooled"
    layers_pooled: bool = False
    dtype: str = choice("float16", names.DTYPES)
    shard_size: int = bounded(1000, COUNT)
    format: str = choice(names.BACKENDS[0], names.BACKENDS)  # mrlcache.cache.backends


@dataclass
class RunOptions:
    """How the pass runs. ``batch_size``: crops per forward pass (None: 8 on the CPU, 128 on
    CUDA; on the CPU large batches are no faster and cost more: their multi-MB activations are
    mapped and unmapped every layer, and page faults took over, b0 at 64 crops: 60% of the
    time in the kernel). ``workers``: decoding workers (None: on the CPU 1 when a core is left
    beside the model's threads, else 0; up to 8 on CUDA; :func:`mrlcache.extract.run.default_workers`).
    ``eval_batch``: eval mode's batches: ``bucket`` (a shard's utterances of exactly equal
    length run together, up to ``batch_size`` and one window of audio; nothing padded:
    :mod:`mrlcache.extract.buckets`) or ``single`` (one utterance a forward, as before)."""

    seed: int = bounded(0, SEED)  # every random choice: crop positions, augmentation, random weights
    batch_size: int | None = bounded(None, COUNT)
    workers: int | None = bounded(None, NON_NEGATIVE_INT)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    eval_batch: str = choice("bucket", names.EVAL_BATCHES)


@dataclass
class ExtractConfig:
    """Everything the cached vectors depend on, plus how the pass is run, by component; the
    flat keys (:mod:`mrlcache.components`) are the ``mrlcache extract`` options. Checked when
    made: :meth:`of` makes one from flat options (``ExtractConfig.of(mode="eval")``)."""

    backbone: BackboneOptions = field(default_factory=BackboneOptions)
    views: ViewOptions = field(default_factory=ViewOptions)
    storage: StorageOptions = field(default_factory=StorageOptions)
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def of(cls, **options) -> "ExtractConfig":
        """The checked config of flat options (any key of :func:`mrlcache.components.leaves`)
        or groups given nested; an unknown one is an ExtractError."""
        try:
            return components.build(cls, components.flatten(cls, options, ExtractError))
        except TypeError as err:
            raise ExtractError(f"extract: {err}") from None

    @property
    def stream_names(self) -> tuple[str, ...]:
        from mrlcache.streams import parse_streams

        return parse_streams(self.storage.streams)

    @property
    def eval_window(self) -> float | None:
        """The window whole utterances are computed in: ``window_seconds`` in eval mode; None for crops."""
        return self.views.window_seconds if self.views.mode == "eval" else None

    @property
    def needs_redimnet(self) -> bool:
        """True when a stream comes from the backbone (any encoder): pooled, or layers without a PTM."""
        from mrlcache.streams import spec

        return any(spec(n).needs_backbone and not (self.backbone.ptm and spec(n).from_ptm) for n in self.stream_names)

    def __post_init__(self):
        from mrlcache.streams import StreamError, spec

        backbone, views = self.backbone, self.views
        try:
            streams = self.stream_names
        except StreamError as err:
            raise ExtractError(str(err)) from None
        if self.storage.layers_pooled and not any(spec(n).poolable for n in streams):
            raise ExtractError("--layers-pooled applies to the layers stream: add layers to --streams")
        check_choices(self, ExtractError)
        if backbone.ptm_weights is not None and backbone.ptm is None:
            raise ExtractError("--ptm-weights needs --ptm NAME (the model the file holds)")
        if views.mode == "eval":
            views.count = 1
        check_fields(self, ExtractError)
        if backbone.engine == "onnxruntime" and (not pooled_only(streams)
                                                 or backbone.precision not in ("auto", "fp32")):
            raise ExtractError("--engine onnxruntime computes the pooled stream in float32: use --streams pooled "
                               "and --precision auto|fp32, or the torch engine")
        if backbone.engine == "fused" and "layers" in streams:
            raise ExtractError("--engine fused folds the backbone's BatchNorm and changes its layout, so its stages "
                               "are not the layers stream: drop layers from --streams, or use the torch engine")
