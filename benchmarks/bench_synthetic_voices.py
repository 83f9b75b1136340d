"""Real encoders against random ones on the synthetic voices (issue 20), per corpus variant.

    python benchmarks/bench_synthetic_voices.py                                # default corpus
    python benchmarks/bench_synthetic_voices.py --voices plain --channel clean
    python benchmarks/bench_synthetic_voices.py --voices plain --channel clean --seed 1 --encoders ecapa,ecapa-rand

Synthesises ``speakers`` test speakers (indices 100.. of the corpus seeded ``seed``, two
videos each, ``utterances`` utterances of exactly ``seconds`` s, as ``make-corpus`` writes
them) and embeds every utterance with each encoder: SpeechBrain's ECAPA-TDNN and
3D-Speaker's CAM++ with their published weights (../shared/fixtures/encoders), a random
ECAPA-TDNN c1024 and a random ReDimNet b0. Scores every pair by cosine: targets are the
same speaker in two videos, non-targets every pair of two speakers. Prints one line per
encoder: the EER of its own embedding (``published``), of the raw pooled statistics and of
the pooled statistics centred on the test mean; beside the first and the last, the EER with
same-video targets instead (how much the video's channel helps). ``--double-spread``
doubles the spread of f0 and tract length around each sex class (a patched ``draw_speaker``,
an experiment only: the corpus has no such option). Run by hand; never a test.
"""

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

import mrlcache.demo.voice as voice
from mrlcache.backbone import load_backbone
from mrlcache.metrics import eer

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "encoders"
ENCODERS = {
    "ecapa": dict(source=str(FIXTURES / "ecapa-voxceleb")),
    "campplus": dict(source=str(FIXTURES / "campplus-zh-en" / "campplus_cn_en_common.pt")),
    "ecapa-rand": dict(source="c1024", backbone="ecapa-tdnn", random_init=True),
    "b0-rand": dict(source="b0", random_init=True),
}


def double_spread():
    """Patch draw_speaker: f0 and tract length twice as far from their sex class's centre."""
    draw = voice.draw_speaker

    def wide(seed, index, voices="default"):
        spk = draw(seed, index, voices)
        f0c, vtlc = (205.0, 1.15) if spk.vtl > 1.075 else (118.0, 1.0)  # the class means of draw_speaker
        return dataclasses.replace(spk, f0_mean=f0c * (spk.f0_mean / f0c) ** 2, vtl=vtlc + 2 * (spk.vtl - vtlc))

    voice.draw_speaker = wide


def waves(args):
    """(N, T) float32 waves, (N,) speaker and (N,) video of every test utterance."""
    rows = [(s, u % 2, u) for s in range(100, 100 + args.speakers) for u in range(args.utterances)]
    pcm = [voice.utterance_audio(args.seed, s, v, u, seconds=(args.seconds, args.seconds), voices=args.voices,
                                 channel=args.channel) for s, v, u in rows]
    return np.stack(pcm).astype(np.float32) / 32768.0, np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def embed(name, x, batch=16):
    """Pooled statistics (N, P) and the encoder's own embedding (N, E)."""
    model = load_backbone(**ENCODERS[name])
    pooled, emb = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            p = model.pooled(torch.from_numpy(x[i:i + batch]))
            pooled.append(p.numpy())
            emb.append(model.head(p).numpy())
    return np.concatenate(pooled), np.concatenate(emb)


def pair_eers(vectors, speaker, video):
    """EER (%) of cosine scores with cross-video targets, and with same-video targets."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    i, j = np.triu_indices(len(v), 1)
    scores = np.einsum("nd,nd->n", v[i], v[j])
    same, cross = speaker[i] == speaker[j], video[i] != video[j]
    out = []
    for target in (same & cross, same & ~cross):
        keep = target | ~same
        out.append(100 * eer(scores[keep], target[keep].astype(int))[0])
    return out, int((same & cross).sum()), int((~same).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voices", choices=voice.VOICES, default="default")
    parser.add_argument("--channel", choices=voice.CHANNELS, default="varied")
    parser.add_argument("--double-spread", action="store_true")
    parser.add_argument("--speakers", type=int, default=24)
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoders", default=",".join(ENCODERS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.double_spread:
        double_spread()
    start = time.perf_counter()
    x, speaker, video = waves(args)
    print(f"# voices={args.voices} channel={args.channel} double_spread={args.double_spread} seed={args.seed}: "
          f"{args.speakers} speakers x {args.utterances} utterances x {args.seconds} s "
          f"(synthesised in {time.perf_counter() - start:.0f} s)", flush=True)
    for name in args.encoders.split(","):
        start = time.perf_counter()
        pooled, emb = embed(name, x)
        (pub, pub_same), targets, non = pair_eers(emb, speaker, video)
        (raw, _), _, _ = pair_eers(pooled, speaker, video)
        (cen, cen_same), _, _ = pair_eers(pooled - pooled.mean(0), speaker, video)
        print(f"{name:10s} published {pub:5.1f} (same video {pub_same:5.1f})  raw {raw:5.1f}  centred {cen:5.1f} "
              f"(same video {cen_same:5.1f})  {targets} targets, {non} non-targets, {time.perf_counter() - start:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
