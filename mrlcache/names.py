"""The names of every registry, in one module that imports neither torch nor click.

The command line's choices are these tuples, so ``mrlcache --help`` lists them without
loading a model. Where a registry is itself torch-free (heads, fusions, export formats,
backbones) its keys are read from it; the others (streams, PTMs, storage backends, losses)
are keyed by exactly one of these tuples, in the same order: ``tests/test_names.py`` checks
every pair. Adding a head, loss, fusion, stream, backend,
PTM or export format is its own file plus one name here.
"""

from mrlcache.backbone.registry import backbone_names
from mrlcache.export.formats import FORMATS as _EXPORT_FORMATS
from mrlcache.models import FUSIONS as _FUSIONS
from mrlcache.models import HEADS as _HEADS

# The registries that are torch-free themselves: these names are their keys, not a copy.
HEADS = tuple(_HEADS)  # mrlcache.models.HEADS
FUSIONS = tuple(_FUSIONS)  # mrlcache.models.FUSIONS
EXPORT_FORMATS = tuple(_EXPORT_FORMATS)  # mrlcache.export.formats.FORMATS
BACKBONES = backbone_names()  # mrlcache.backbone.registry
LOSSES = ("aam", "softmax")  # AAM softmax with margin, or the same scaled cosine logits without
CLASSIFIERS = ("shared", "per-dim")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "plateau")
STREAMS = ("pooled", "layers", "fbank", "mfcc", "f0")  # mrlcache.streams.STREAMS
PTMS = ("wavlm-base-plus", "hubert-base", "wav2vec2-base")  # mrlcache.streams.ptm.PTMS
BACKENDS = ("zarr", "hdf5")  # mrlcache.cache.backends.BACKENDS
ENGINES = ("torch", "fused", "onnxruntime", "auto")  # what runs the backbone in extract and embed (mrlcache/engines.py)
VECTOR_FORMATS = ("npy", "kaldi", "npz")  # mrlcache.interop.write_vectors
SYSTEMS = ("mrl", "fixed", "raw", "published", "pca", "lda")  # mrlcache.evaluate.SYSTEMS
NORMS = ("asnorm", "snorm")  # score normalisations (mrlcache.scoring)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # mrlcache.runtime.PRECISIONS (extract)
FIT_PRECISIONS = ("fp32", "bf16")  # a fit on the CPU; CUDA always uses fp16 AMP
DEVICES = ("auto", "cpu", "cuda")  # a fit's --device (extract and the scorers also take cuda:N)
DTYPES = ("float16", "float32")  # stored and in-memory feature dtypes
MODES = ("train", "eval")  # extract: crops with augmentation, or whole utterances
EVAL_BATCHES = ("bucket", "single")  # extract, eval mode: equal lengths batched, or one utterance a forward
LAYOUTS = ("views", "layers")  # import-vectors: what K of (N, K, D) input is
INITS = ("auto", "random", "published")  # fit --init: the head's first weights
INIT_ROTATIONS = ("auto", "pca", "lda", "whitened")  # fit --init-rotation
OBJECTIVES = ("margin", "adaptor", "adaptor-supervised")  # fit --objective
VOICES = ("default", "plain")  # make-corpus --voices (mrlcache.demo.voice.VOICES)
CHANNELS = ("varied", "clean")  # make-corpus --channel (mrlcache.demo.voice.CHANNELS)
