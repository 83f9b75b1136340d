"""What an extraction is asked to do: :class:`ExtractConfig` (every setting the cached
vectors depend on, plus how the pass is run) and its error type."""

from __future__ import annotations

from dataclasses import dataclass, field

from mrlcache import names
from mrlcache.streams import pooled_only
from mrlcache.ranges import (CAP_SECONDS, COUNT, DEFAULT_WINDOW_SECONDS, NON_NEGATIVE_INT, SECONDS, SEED,
                             WINDOW_SECONDS, bounded, check_choices, check_fields, choice)


def _no_augment_settings():
    from mrlcache.augment import AugmentConfig  # numpy and the audio stack: not for --help

    return AugmentConfig()


class ExtractError(Exception):
    """Settings that cannot work (bad device/precision, nothing to extract...)."""


@dataclass
class ExtractConfig:
    """Everything the cached vectors depend on, plus how the pass is run.

    Attributes:
        mode: "train" (``views`` crops per utterance) or "eval" (the whole utterance).
        views: crops per utterance in train mode; view 0 clean, the others augmented.
        crop_seconds: crop length in train mode (shorter utterances are repeat-padded).
        max_seconds: eval mode: keep at most this much of each utterance (None: all).
        window_seconds: eval mode: utterances longer than this are computed window by
            window, their statistics combined (:mod:`mrlcache.streams.windows`), so memory
            stays that of one window; None: one pass each, memory growing with length.
        min_seconds: utterances shorter than this are skipped as "too_short".
        seed: seed of every random choice (crop positions, augmentation).
        shard_size: utterances per shard.
        dtype: "float16" or "float32" storage of the pooled vectors.
        batch_size: crops per forward pass (None: 8 on the CPU, 128 on CUDA). On the CPU,
            large batches are no faster and cost more: their multi-MB activations are
            mapped and unmapped every layer, and page faults took over (b0, 64 crops:
            60% of the time in the kernel).
        workers: DataLoader decoding workers (None: 1 on CPU, up to 8 on CUDA).
        device: "auto", "cpu", "cuda", "cuda:N".
        precision: "auto" (bf16/fp16 autocast on CUDA, fp32 on CPU), "fp32", "bf16", "fp16".
        augment: augmentation settings of views 1..K-1.
        streams: comma-separated streams to store (``mrlcache.streams.STREAMS``): "pooled"
            (today's cache), "layers", "fbank", "mfcc", "f0"; every stream in ``dtype``.
        layers_pooled: store per-layer mean and std over time instead of the layer frames.
        ptm: "wavlm-base-plus", "hubert-base" or "wav2vec2-base": its 13 hidden states
            are the ``layers`` stream (pooled then needs a backbone as well).
        ptm_weights: a local state_dict file of the PTM instead of the download.
        engine: what runs the backbone (:mod:`mrlcache.engines`): "torch" (the reference),
            "fused" (ReDimNet folded, channels-last), "onnxruntime" (exported, CPU), or
            "auto" (on the CPU for a pooled-only float32 job the fastest measured engine that
            runs the backbone, else torch). The engine used is recorded in cache.json.
    """

    mode: str = choice("train", names.MODES)
    views: int = bounded(4, COUNT)
    crop_seconds: float = bounded(2.0, SECONDS)
    max_seconds: float | None = bounded(None, CAP_SECONDS)
    window_seconds: float | None = bounded(DEFAULT_WINDOW_SECONDS, WINDOW_SECONDS)
    min_seconds: float = bounded(0.5, SECONDS)
    seed: int = bounded(0, SEED)
    shard_size: int = bounded(1000, COUNT)
    dtype: str = choice("float16", names.DTYPES)
    batch_size: int | None = bounded(None, COUNT)
    workers: int | None = bounded(None, NON_NEGATIVE_INT)
    device: str = "auto"
    precision: str = choice("auto", names.PRECISIONS)
    augment: AugmentConfig = field(default_factory=_no_augment_settings)
    streams: str = "pooled"
    layers_pooled: bool = False
    ptm: str | None = choice(None, names.PTMS)
    ptm_weights: str | None = None
    # fused: ReDimNet with BatchNorm folded, channels-last; onnxruntime: CPU, pooled only;
    # auto: chosen in extract(). The engine used is recorded in cache.json (vectors of any
    # but torch are within ~1e-5 of torch's, not bit-equal).
    engine: str = choice("torch", names.ENGINES)

    @property
    def stream_names(self) -> tuple[str, ...]:
        from mrlcache.streams import parse_streams

        return parse_streams(self.streams)

    @property
    def eval_window(self) -> float | None:
        """The window whole utterances are computed in: ``window_seconds`` in eval mode; None for crops."""
        return self.window_seconds if self.mode == "eval" else None

    @property
    def needs_redimnet(self) -> bool:
        """True when a stream comes from the backbone (any encoder): pooled, or layers without a PTM."""
        from mrlcache.streams import spec

        return any(spec(n).needs_backbone and not (self.ptm and spec(n).from_ptm) for n in self.stream_names)

    def __post_init__(self):
        from mrlcache.streams import StreamError, spec

        try:
            streams = self.stream_names
        except StreamError as err:
            raise ExtractError(str(err)) from None
        if self.layers_pooled and not any(spec(n).poolable for n in streams):
            raise ExtractError("--layers-pooled applies to the layers stream: add layers to --streams")
        check_choices(self, ExtractError)
        if self.ptm_weights is not None and self.ptm is None:
            raise ExtractError("--ptm-weights needs --ptm NAME (the model the file holds)")
        if self.mode == "eval":
            self.views = 1
        check_fields(self, ExtractError)
        if self.engine == "onnxruntime" and (not pooled_only(self.stream_names) or self.precision not in ("auto", "fp32")):
            raise ExtractError("--engine onnxruntime computes the pooled stream in float32: use --streams pooled "
                               "and --precision auto|fp32, or the torch engine")
        if self.engine == "fused" and "layers" in streams:
            raise ExtractError("--engine fused folds the backbone's BatchNorm and changes its layout, so its stages "
                               "are not the layers stream: drop layers from --streams, or use the torch engine")
