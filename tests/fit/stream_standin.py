"""A tiny synthetic stream cache behind the cache reader contract, for the stream-fit tests.

:class:`StandInCache` implements exactly what mrlcache.cache's reader promises for frame
streams (``streams``, ``read(stream, view, rows, dtype)``, ``utterances``, ``speakers``,
``num_views``, ``meta``, ``path``, ``dim``), in memory. :func:`stream_cache` is the one
builder the tests call: after the merge it can write a real cache with the same arrays.

Each speaker is a latent vector mixed into every stream by fixed matrices (the "physics");
each utterance adds a strong nuisance (3x the speaker's scale) through other directions,
each view and frame small noise. A head that learns to drop the nuisance directions on
training speakers separates unseen ones; raw cosine on time-averaged streams cannot.
"""

from __future__ import annotations

import numpy as np

from mrlcache.streams import StreamRecord

LAYERS, LAYER_DIM, FBANK, POOLED, FRAMES = 3, 8, 10, 12, 20


class StandInCache:
    """In-memory stand-in for an opened train-mode cache holding several streams."""

    def __init__(self, arrays: dict, speakers, path=None, ragged=()):
        self.arrays = arrays  # name -> (N, V, *shape[, T]) float32
        self.speakers = list(speakers)
        self.utterances = [f"{s}/u{i:04d}" for i, s in enumerate(self.speakers)]
        self.num_views = next(iter(arrays.values())).shape[1]
        self.path = path
        self.meta = {"mode": "train", "views": self.num_views, "model_config": {"synthetic": True}}
        self.dim = arrays["pooled"].shape[-1] if "pooled" in arrays else None
        self.streams = {}
        for name, a in arrays.items():
            vector = a.ndim == 3  # (N, V, D): a vector stream
            self.streams[name] = StreamRecord(name, "vector" if vector else "frames",
                                              a.shape[2:] if vector else a.shape[2:-1], "float16",
                                              None if vector else 100.0, name in ragged,
                                              None if vector or name in ragged else a.shape[-1])
        self.shards = [self]  # one shard holding every row

    def __len__(self):
        return len(self.utterances)

    def read(self, stream, view=None, rows=None, dtype=np.float32, out=None):
        if stream not in self.arrays:
            raise KeyError(f"stream {stream!r}: this cache holds {', '.join(self.arrays)}")
        a = self.arrays[stream]
        if rows is not None:
            a = a[np.asarray(rows)]
        if self.streams[stream].ragged:  # eval mode: view 0 only, a list of (*shape, T_i)
            return [x[0].astype(dtype) for x in a]
        got = (a if view is None else a[:, view]).astype(dtype)
        if out is not None:
            out[...] = got
        return got


def make_streams(speakers: int, utts: int, views: int, seed: int, nuisance: float = 3.0) -> tuple[dict, list]:
    """-> ({pooled (N, V, 12), layers (N, V, 3, 8, T), fbank (N, V, 10, T), f0 (N, V, 2, T)}, speakers)."""
    mix = np.random.default_rng(1234)
    latent, nui = 4, 3
    a_layers = mix.standard_normal((LAYERS, LAYER_DIM, latent))
    b_layers = mix.standard_normal((LAYERS, LAYER_DIM, nui))
    a_fb, b_fb = mix.standard_normal((FBANK, latent)), mix.standard_normal((FBANK, nui))
    a_pool, b_pool = mix.standard_normal((POOLED, latent)), mix.standard_normal((POOLED, nui))
    a_f0 = mix.standard_normal(latent)
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((speakers, latent))
    spk = np.repeat(np.arange(speakers), utts)
    n = nuisance * rng.standard_normal((len(spk), nui))
    z = s[spk]
    shape = (len(spk), views)

    def frames(base):  # base (N, D) -> (N, V, D, T) with view and frame noise
        return base[:, None, :, None] + 0.5 * rng.standard_normal((*shape, base.shape[1], FRAMES))

    layers = np.einsum("ldk,nk->nld", a_layers, z) + np.einsum("ldk,nk->nld", b_layers, n)  # (N, L, D)
    layers = layers[:, None, :, :, None] + 0.5 * rng.standard_normal((*shape, LAYERS, LAYER_DIM, FRAMES))
    fbank = frames(z @ a_fb.T + n @ b_fb.T)
    pooled = (z @ a_pool.T + n @ b_pool.T)[:, None] + 0.3 * rng.standard_normal((*shape, POOLED))
    logf0 = 0.3 * (z @ a_f0)[:, None, None] + 0.05 * rng.standard_normal((*shape, FRAMES))
    f0 = 100.0 * 2.0 ** logf0
    voiced = rng.random((*shape, FRAMES)) > 0.2
    f0 = np.where(voiced, f0, np.nan)  # unvoiced frames are NaN, as the f0 stream stores them
    f0 = np.stack([f0, np.where(voiced, 0.9, 0.1)], axis=2)  # (N, V, 2, T)
    arrays = {"pooled": pooled, "layers": layers, "fbank": fbank, "f0": f0}
    return {k: v.astype(np.float32) for k, v in arrays.items()}, [f"spk{seed}_{i:03d}" for i in spk]


def stream_cache(speakers: int = 40, utts: int = 6, views: int = 2, seed: int = 0, path=None,
                 streams=("pooled", "layers", "fbank", "f0")) -> StandInCache:
    """The cache the stream-fit tests train on (swap for a real one written by extract after the merge)."""
    arrays, spk = make_streams(speakers, utts, views, seed)
    return StandInCache({k: arrays[k] for k in streams}, spk, path=path)
