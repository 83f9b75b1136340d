"""The voice model of the synthetic corpus: speakers, utterances and recording channels.

Every test, benchmark and the demo need speech-like audio whose speaker identity is real
(stable across utterances and recording channels) but not trivial to read off simple
statistics. This module makes it with numpy/scipy only (:mod:`mrlcache.demo.synth` writes
the corpus):

- **Speaker** (:class:`Speaker`): a stable identity drawn from overlapping population
  distributions: f0 mean and range, vocal-tract length (scales every formant), per-vowel
  formant offsets (idiolect), higher formants F4/F5, bandwidths, glottal pulse shape,
  spectral tilt, breathiness, jitter/shimmer, speaking rate, a hypopharyngeal
  antiresonance. Two speakers of the same sex class often differ only a little.
- **Utterance**: a fresh random syllable sequence (onset consonant, vowel, coda) grouped
  into phrases separated by pauses, with pitch accents, phrase declination and a final
  fall. Control tracks are built at 1 kHz, smoothed (coarticulation) and drive a
  Rosenberg glottal pulse train (jitter per cycle, shimmer per cycle, pulsed aspiration)
  and noise sources (fricatives, bursts, aspiration).
- **Filter**: the time-varying vocal tract is applied in the STFT domain: per frame the
  complex response of five cascaded second-order resonators (Klatt-style, unity DC gain)
  times the speaker's extra resonance, antiresonance and tilt, for the voiced branch; a
  Gaussian band per frame for the frication branch. This keeps the whole utterance a handful of vectorised
  array operations (no per-sample Python loop).
- **Video** (:class:`Channel`): a recording session: a small per-session shift of the
  speaker's pitch and vocal effort, then a channel: optional room reverberation, a
  broad peaking EQ band, band limiting, additive coloured noise at a random SNR, a gain.
- **Variants** (opt-in, ``make-corpus --voices plain --channel clean``): voices without the
  fixed resonance and antiresonance, every video recorded alike (see ``VOICES``).

Reference values: vowel formants are the adult male averages of Peterson & Barney (1952),
"Control methods used in a study of the vowels", JASA 24(2); the resonator is the
second-order digital resonator of Klatt (1980), "Software for a cascade/parallel formant
synthesizer", JASA 67(3); the glottal pulse is Rosenberg (1971), "Effect of glottal
pulse shape on the quality of natural vowels", JASA 49(2B); the peaking EQ follows
R. Bristow-Johnson's "Audio EQ Cookbook".

Determinism: every random draw comes from a generator seeded by
``SeedSequence(seed, spawn_key=(kind, speaker, ...))``, so a speaker's voice, videos and
utterances depend only on ``seed`` and the speaker's index, never on how many other
speakers the corpus holds; same seed -> same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import signal
from scipy.ndimage import gaussian_filter1d

# spawn_key kinds: one independent stream per purpose.
_SPEAKER, _VIDEO, _UTTERANCE, _TRIALS = 1, 2, 3, 4

_CONTROL_RATE = 1000  # control tracks are built at 1 kHz (one row per millisecond)
_NFFT, _HOP = 512, 128  # STFT for the time-varying filter: 32 ms frames, 8 ms hop at 16 kHz


# Vowels: F1, F2, F3 in Hz for an adult male (Peterson & Barney 1952 averages).
VOWELS = {
    "i": (270, 2290, 3010), "I": (390, 1990, 2550), "E": (530, 1840, 2480),
    "ae": (660, 1720, 2410), "a": (730, 1090, 2440), "O": (570, 840, 2410),
    "U": (440, 1020, 2240), "u": (300, 870, 2240), "V": (640, 1190, 2390),
    "3r": (490, 1350, 1690),
}
# Voiced consonants (nasals, liquids, glides): formant targets, amplitude, bandwidth factor.
SONORANTS = {
    "m": ((250, 1100, 2300), 0.25, 2.0), "n": ((250, 1600, 2600), 0.25, 2.0),
    "l": ((350, 1000, 2700), 0.45, 1.3), "w": ((300, 700, 2200), 0.45, 1.2),
    "j": ((280, 2200, 2900), 0.45, 1.2),
}
# Fricatives: centre and width of the noise band (Hz), noise level, voicing level.
FRICATIVES = {
    "s": (6000, 1500, 0.30, 0.0), "S": (3300, 1000, 0.30, 0.0), "f": (4500, 3500, 0.10, 0.0),
    "T": (5000, 3000, 0.07, 0.0), "z": (6000, 1500, 0.15, 0.35), "v": (4500, 3500, 0.06, 0.35),
}
# Stop bursts: centre and width of the burst band (Hz); voiceless stops get aspiration.
STOPS = {"p": (1000, 2500, True), "t": (4500, 2500, True), "k": (2200, 1500, True),
         "b": (1000, 2500, False), "d": (4000, 2500, False), "g": (2000, 1500, False)}

# Row layout of the control table (one row per millisecond after np.repeat).
_COLS = ["voice", "asp", "fric", "fc", "fbw", "F1", "F2", "F3", "bw", "accent", "phrase"]
_C = {name: i for i, name in enumerate(_COLS)}


@dataclass(frozen=True)
class Speaker:
    """A stable voice identity; all frequencies in Hz, levels linear unless named ``_db``."""

    f0_mean: float  # mean fundamental frequency
    f0_range: float  # spread of pitch accents, semitones
    declination: float  # pitch fall over a phrase, semitones
    vtl: float  # vocal-tract scale: every formant is multiplied by it
    vowel_offsets: np.ndarray  # (len(VOWELS)+len(SONORANTS), 3) relative formant offsets
    f4: float
    f5: float
    bw_scale: float  # multiplies every formant bandwidth
    open_quotient: float  # Rosenberg pulse: open phase fraction of the period
    rise_fraction: float  # fraction of the open phase spent opening
    tilt_db: float  # extra spectral slope, dB per octave
    breath_db: float  # aspiration noise relative to the glottal pulses
    jitter: float  # relative period perturbation per cycle
    shimmer: float  # relative amplitude perturbation per cycle
    rate: float  # speaking rate (durations are divided by it)
    pause_scale: float  # length of pauses between phrases
    zero_freq: float  # hypopharyngeal antiresonance
    zero_bw: float
    extra_freq: float  # a fixed extra resonance (nasal/subglottal coupling)
    extra_bw: float
    fric_scale: float  # shifts fricative bands (smaller tract -> higher)
    fixed_filters: bool = True  # apply the extra resonance and the antiresonance (False: plain voices)


@dataclass(frozen=True)
class Channel:
    """One "video": a recording session (speaker state) and its channel."""

    f0_shift: float  # semitones
    tilt_shift: float  # dB per octave (vocal effort)
    rate_scale: float
    highpass: float  # Hz
    lowpass: float  # Hz (>= Nyquist means none)
    eq: tuple  # ((centre Hz, gain dB, Q), ...)
    reverb_rt60: float  # seconds; 0 = no reverberation
    reverb_drr_db: float  # direct-to-reverberant ratio
    snr_db: float  # mean SNR of the session; each utterance varies around it
    noise_colour: float  # one-pole coefficient of the noise filter (0 white, ->1 brown)
    level_db: float  # output RMS in dBFS


# Opt-in variants of the corpus (make-corpus --voices, --channel); the first is the default.
# "plain" voices drop the speaker's fixed extra resonance and antiresonance, and a "clean"
# channel records every video alike (below): on the default corpus a random encoder, which
# reads those fixed spectral shapes and the shared channel of a video, scores nearly as
# well as encoders trained on VoxCeleb, which learnt to ignore what looks like an EQ
# (benchmarks/README.md, "issue 20: real encoders on the synthetic corpus").
VOICES = ("default", "plain")
CHANNELS = ("varied", "clean")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def draw_speaker(seed: int, index: int, voices: str = "default") -> Speaker:
    """The voice of speaker ``index`` of the corpus seeded ``seed`` (``voices``: one of VOICES).

    A plain voice is the default one without its fixed extra resonance and antiresonance
    (the same draws, so the same speaker otherwise).
    """
    if voices not in VOICES:
        raise ValueError(f"voices={voices!r}: use one of {', '.join(VOICES)}")
    rng = _rng(seed, _SPEAKER, index)
    # A latent sex class moves f0 and tract length together; within a class the spreads
    # are wide enough that many pairs overlap (these are the hard non-target trials).
    female = rng.random() < 0.5
    f0_mean = float(np.exp(rng.normal(np.log(205.0 if female else 118.0), 0.14)))
    vtl = float(rng.normal(1.15 if female else 1.0, 0.06))
    return Speaker(
        f0_mean=f0_mean,
        f0_range=float(rng.uniform(1.0, 3.5)),
        declination=float(rng.uniform(1.0, 4.0)),
        vtl=vtl,
        vowel_offsets=rng.normal(0.0, 0.07, size=(len(VOWELS) + len(SONORANTS), 3)),
        f4=float(rng.normal(3450.0, 300.0)),
        f5=float(rng.normal(4400.0, 350.0)),
        bw_scale=float(np.exp(rng.normal(0.0, 0.3))),
        open_quotient=float(rng.uniform(0.45, 0.75)),
        rise_fraction=float(rng.uniform(0.55, 0.8)),
        tilt_db=float(rng.normal(-1.0, 2.5)),
        breath_db=float(rng.uniform(-32.0, -12.0)),
        jitter=float(rng.uniform(0.003, 0.02)),
        shimmer=float(rng.uniform(0.02, 0.10)),
        rate=float(np.exp(rng.normal(0.0, 0.15))),
        pause_scale=float(np.exp(rng.normal(0.0, 0.3))),
        zero_freq=float(rng.uniform(2500.0, 5500.0)),
        zero_bw=float(rng.uniform(150.0, 400.0)),
        extra_freq=float(rng.uniform(700.0, 2500.0)),
        extra_bw=float(rng.uniform(100.0, 300.0)),
        fric_scale=float(rng.normal(1.0, 0.05)),
        fixed_filters=voices == "default",
    )


def draw_channel(seed: int, speaker: int, video: int, channel: str = "varied") -> Channel:
    """The session state and channel of video ``video`` of speaker ``speaker`` (``channel``: one of CHANNELS).

    A clean channel keeps the session's pitch and rate shift and its level, and drops the
    rest: no vocal-effort tilt, room, EQ or band limit; noise at 50 dB SNR.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel={channel!r}: use one of {', '.join(CHANNELS)}")
    rng = _rng(seed, _VIDEO, speaker, video)
    reverb = rng.random() < 0.3
    chan = Channel(
        f0_shift=float(rng.normal(0.0, 0.7)),
        tilt_shift=float(rng.normal(0.0, 4.0)),
        rate_scale=float(np.exp(rng.normal(0.0, 0.05))),
        highpass=float(rng.uniform(50.0, 150.0)),
        lowpass=float(rng.uniform(5000.0, 7600.0)) if rng.random() < 0.3 else float("inf"),
        eq=tuple(
            (float(np.exp(rng.uniform(np.log(150.0), np.log(6000.0)))),
             float(rng.normal(0.0, 1.5)), float(rng.uniform(0.5, 1.5)))
            for _ in range(1)
        ),
        reverb_rt60=float(rng.uniform(0.1, 0.4)) if reverb else 0.0,
        reverb_drr_db=float(rng.uniform(3.0, 15.0)),
        snr_db=float(rng.uniform(15.0, 35.0)),
        noise_colour=float(rng.uniform(-0.5, 0.95)),
        level_db=float(rng.uniform(-32.0, -18.0)),
    )
    if channel == "clean":
        chan = replace(chan, tilt_shift=0.0, highpass=60.0, lowpass=float("inf"), eq=(), reverb_rt60=0.0,
                       snr_db=50.0)
    return chan


# ----------------------------------------------------------------------------- utterance


def _segments(spk: Speaker, chan: Channel, rng: np.random.Generator, total_ms: int) -> np.ndarray:
    """A random phrase/syllable sequence as control rows: (num_segments, 1 + len(_COLS)).

    Column 0 is the duration in ms; the rest follow ``_COLS``. Formants of unvoiced
    segments are NaN and later take the next voiced target (anticipatory coarticulation).
    """
    rate = spk.rate * chan.rate_scale
    vowel_names, son_names = list(VOWELS), list(SONORANTS)
    nan3 = (np.nan, np.nan, np.nan)
    rows: list[tuple] = []

    def add(ms, voice=0.0, asp=0.0, fric=0.0, fc=1000.0, fbw=1000.0, formants=nan3, bw=1.0,
            accent=0.0, phrase=0):
        rows.append((max(1, int(round(ms))), voice, asp, fric, fc, fbw, *formants, bw, accent, phrase))

    def formants_of(table_index, base):
        off = spk.vowel_offsets[table_index]
        return tuple(spk.vtl * f * (1.0 + o) for f, o in zip(base, off))

    def consonant(phrase, stress, where):
        probs = [0.4, 0.35, 0.25] if where == "onset" else [0.5, 0.5, 0.0]  # no stop codas
        kind = rng.choice(["son", "fric", "stop"], p=probs)
        if kind == "son":
            name = son_names[rng.integers(len(son_names))]
            base, amp, bw = SONORANTS[name]
            add(rng.uniform(40, 90) / rate, voice=amp * stress,
                formants=formants_of(len(VOWELS) + son_names.index(name), base), bw=bw, phrase=phrase)
        elif kind == "fric":
            name = list(FRICATIVES)[rng.integers(len(FRICATIVES))]
            fc, fbw, level, voicing = FRICATIVES[name]
            add(rng.uniform(70, 150) / rate, voice=voicing * stress, fric=level * stress,
                fc=fc * spk.vtl * spk.fric_scale, fbw=fbw, phrase=phrase)
        else:
            name = list(STOPS)[rng.integers(len(STOPS))]
            fc, fbw, voiceless = STOPS[name]
            add(rng.uniform(30, 80) / rate, phrase=phrase)  # closure
            add(rng.uniform(8, 20) / rate, fric=0.6 * stress, fc=fc * spk.vtl * spk.fric_scale,
                fbw=fbw, phrase=phrase)  # burst
            if voiceless:
                add(rng.uniform(20, 60) / rate, asp=0.25 * stress, phrase=phrase)

    add(rng.uniform(50, 250))  # leading silence
    elapsed, phrase = rows[-1][0], 0
    while elapsed < total_ms:
        phrase += 1
        for _ in range(rng.integers(2, 8)):
            stressed = rng.random() < 0.35
            stress = 1.3 if stressed else 1.0
            # Pitch accents: stressed syllables jump up by about the speaker's range.
            accent = spk.f0_range * (rng.normal(1.0, 0.4) if stressed else rng.normal(0.0, 0.3))
            if rng.random() < 0.75:
                consonant(phrase, stress, "onset")
            v = rng.integers(len(vowel_names))
            add(rng.uniform(80, 200) * stress / rate, voice=stress, accent=accent,
                formants=formants_of(v, VOWELS[vowel_names[v]]), phrase=phrase)
            if rng.random() < 0.45:
                consonant(phrase, stress, "coda")
        add(rng.uniform(150, 600) * spk.pause_scale, phrase=0)  # pause between phrases
        elapsed = sum(r[0] for r in rows)
    return np.array(rows, dtype=np.float64)


def _fill_next(x: np.ndarray) -> np.ndarray:
    """Replace NaN rows by the next valid row (the last valid row at the end). x: (T, K)."""
    valid = ~np.isnan(x[:, 0])
    if not valid.any():  # a very short cut with no voiced segment: formants are never heard
        return np.full_like(x, 500.0)
    idx = np.where(valid, np.arange(len(x)), len(x))
    idx = np.minimum.accumulate(idx[::-1])[::-1]  # index of the next valid row
    last = np.flatnonzero(valid)[-1]
    return x[np.where(idx == len(x), last, idx)]


def _resonators(freq: np.ndarray, bw: np.ndarray, z1: np.ndarray, sr: int) -> np.ndarray:
    """Complex response of cascaded unity-DC-gain resonators.

    freq, bw: (F, K) Hz per frame and resonator; z1: (N,) e^{-jw} per bin. Returns (F, N).
    Resonators at or above 0.45 * sr are left out (they cannot be represented).
    """
    r = np.exp(-np.pi * bw / sr)[..., None]  # (F, K, 1)
    c = (2.0 * r * np.cos(2.0 * np.pi * freq / sr)[..., None])
    den = 1.0 - c * z1 + r * r * z1 * z1  # (F, K, N)
    h = (1.0 - c + r * r) / den
    h = np.where((freq < 0.45 * sr)[..., None], h, 1.0)
    return h.prod(axis=1)


def synthesise(spk: Speaker, chan: Channel, rng: np.random.Generator, num_samples: int,
               sample_rate: int = 16000, return_f0: bool = False):
    """One clean utterance of ``spk`` in session ``chan`` (before the channel). Returns (T,) float64.

    With ``return_f0`` (the same random draws, so the same wave): ``(wave, f0, voicing)``,
    each (T,) float64 per sample: the F0 contour in Hz that drives the glottal pulses
    (before per-cycle jitter) and the voicing amplitude of the glottal source (0 silent or
    unvoiced, about 1 in vowels, 0.25-0.45 in sonorants and voiced fricatives).
    """
    sr, n = sample_rate, num_samples
    total_ms = int(np.ceil(n * _CONTROL_RATE / sr)) + 1
    seg = _segments(spk, chan, rng, total_ms)
    ctl = np.repeat(seg[:, 1:], seg[:, 0].astype(int), axis=0)[:total_ms]  # (ms, len(_COLS))

    # Smooth control tracks: formants glide (coarticulation), amplitudes ramp in ~10 ms.
    formants = gaussian_filter1d(_fill_next(ctl[:, _C["F1"]:_C["F3"] + 1]), 20.0, axis=0)
    bw_mult = gaussian_filter1d(ctl[:, _C["bw"]], 15.0)
    amps = gaussian_filter1d(ctl[:, [_C["voice"], _C["asp"], _C["fric"]]], 6.0, axis=0)
    fband = gaussian_filter1d(ctl[:, [_C["fc"], _C["fbw"]]], 10.0, axis=0)
    fade = np.minimum(1.0, (total_ms - np.arange(total_ms)) / 30.0)  # no click at the cut
    amps *= fade[:, None]

    # Pitch: accents (smoothed), declination within each phrase, a slow drift, session shift.
    t_ms = np.arange(total_ms)
    phrase = ctl[:, _C["phrase"]].astype(int)
    starts = np.full(phrase.max() + 1, total_ms)
    np.minimum.at(starts, phrase, t_ms)
    lengths = np.maximum(np.bincount(phrase, minlength=len(starts)), 1)
    rel = (t_ms - starts[phrase]) / lengths[phrase]  # 0 -> 1 through each phrase
    drift = 0.4 * np.sin(2 * np.pi * t_ms / rng.uniform(700, 1500) + rng.uniform(0, 2 * np.pi))
    semitones = (gaussian_filter1d(ctl[:, _C["accent"]], 50.0) + spk.declination * (0.5 - rel)
                 + drift + chan.f0_shift)
    f0_ctl = np.clip(spk.f0_mean * 2.0 ** (semitones / 12.0), 55.0, 500.0)

    # Upsample control tracks to the audio rate.
    t_ctl = np.arange(total_ms) / _CONTROL_RATE
    t = np.arange(n) / sr
    f0 = np.interp(t, t_ctl, f0_ctl)
    voice, asp, fric = (np.interp(t, t_ctl, amps[:, i]) for i in range(3))

    # Glottal source: Rosenberg pulses, period jitter and amplitude shimmer drawn per cycle.
    cycles = int(np.sum(f0) / sr * 1.1) + 10  # jittered periods may add a few cycles
    jitter = np.clip(1.0 + spk.jitter * rng.standard_normal(cycles), 0.9, 1.1)
    phase = np.cumsum(f0 * jitter[np.floor(np.cumsum(f0) / sr).astype(int)] / sr)
    cyc = np.floor(phase).astype(int)
    p = phase - cyc
    tp = spk.open_quotient * spk.rise_fraction
    tn = spk.open_quotient - tp
    flow = np.where(p < tp, 0.5 * (1.0 - np.cos(np.pi * p / tp)),
                    np.where(p < spk.open_quotient, np.cos(0.5 * np.pi * (p - tp) / tn), 0.0))
    pulses = np.diff(flow, prepend=flow[0])  # flow derivative: includes lip radiation
    pulses *= np.clip(1.0 + spk.shimmer * rng.standard_normal(cycles), 0.3, None)[cyc]
    pulses /= np.sqrt(np.mean(pulses**2)) + 1e-12
    noise = rng.standard_normal((3, n))
    breath = 10.0 ** (spk.breath_db / 20.0) * (0.3 + flow) * noise[0]  # pulsed with the glottis
    voiced_src = voice * (pulses + breath) + asp * noise[1]
    fric_src = fric * noise[2]

    # Time-varying filter in the STFT domain: both branches transformed in one call.
    _, times, spec = signal.stft(np.stack([voiced_src, fric_src]), fs=sr, nperseg=_NFFT,
                                 noverlap=_NFFT - _HOP)  # spec: (2, bins, frames)
    freqs = np.fft.rfftfreq(_NFFT, 1.0 / sr)  # (bins,)
    z1 = np.exp(-2j * np.pi * freqs / sr)
    frame_ms = np.clip(np.round(times * _CONTROL_RATE).astype(int), 0, total_ms - 1)
    f_frames = formants[frame_ms]  # (frames, 3)
    nf = len(frame_ms)
    tract = np.concatenate(
        [f_frames, np.full((nf, 1), spk.f4 * spk.vtl), np.full((nf, 1), spk.f5 * spk.vtl)], axis=1)
    bws = spk.bw_scale * (40.0 + 0.05 * tract) * bw_mult[frame_ms][:, None]
    h_voiced = _resonators(tract, bws, z1, sr)  # (frames, bins)
    # Fixed speaker-specific shaping: an extra resonance and an antiresonance (a zero).
    extra = _resonators(np.array([[spk.extra_freq]]), np.array([[spk.extra_bw]]), z1, sr)[0]
    zero = 1.0 / _resonators(np.array([[spk.zero_freq]]), np.array([[spk.zero_bw]]), z1, sr)[0]
    tilt = (np.maximum(freqs, 100.0) / 1000.0) ** ((spk.tilt_db + chan.tilt_shift) / 6.02)
    h_voiced = h_voiced * ((extra * zero * tilt) if spk.fixed_filters else tilt)[None, :]
    fc, fbw = fband[frame_ms, 0:1], fband[frame_ms, 1:2]  # (frames, 1)
    h_fric = np.exp(-0.5 * ((freqs[None, :] - fc) / fbw) ** 2) + 0.02
    # Put the frication band at a level comparable to voiced speech (the resonators have
    # large peak gains while the Gaussian band peaks at 1).
    h_fric *= np.sqrt(np.mean(np.abs(h_voiced) ** 2))
    out_spec = spec[0] * h_voiced.T + spec[1] * h_fric.T
    _, wave = signal.istft(out_spec, fs=sr, nperseg=_NFFT, noverlap=_NFFT - _HOP)
    if return_f0:
        return wave[:n], f0, voice
    return wave[:n]


# ------------------------------------------------------------------------------- channel


def _peaking(fc: float, gain_db: float, q: float, sr: int) -> np.ndarray:
    """A peaking-EQ biquad (Audio EQ Cookbook) as one second-order section (1, 6)."""
    a = 10.0 ** (gain_db / 40.0)
    w = 2.0 * np.pi * fc / sr
    alpha = np.sin(w) / (2.0 * q)
    b = np.array([1.0 + alpha * a, -2.0 * np.cos(w), 1.0 - alpha * a])
    den = np.array([1.0 + alpha / a, -2.0 * np.cos(w), 1.0 - alpha / a])
    return np.concatenate([b / den[0], den / den[0]])[None, :]


def apply_channel(wave: np.ndarray, chan: Channel, rng: np.random.Generator,
                  sample_rate: int = 16000) -> np.ndarray:
    """Room, EQ, band limit, noise and gain of ``chan`` applied to a clean utterance (T,)."""
    sr = sample_rate
    x = wave / (np.sqrt(np.mean(wave**2)) + 1e-12)
    if chan.reverb_rt60 > 0:
        # Exponentially decaying noise tail (-60 dB at RT60) behind a unit direct path.
        length = int(chan.reverb_rt60 * sr)
        tail = rng.standard_normal(length) * np.exp(-6.9 * np.arange(length) / length)
        tail *= 10.0 ** (-chan.reverb_drr_db / 20.0) / np.sqrt(np.sum(tail**2))
        tail[0] = 1.0
        x = signal.fftconvolve(x, tail)[: len(x)]
    sos = [_peaking(fc, g, q, sr) for fc, g, q in chan.eq if fc < 0.45 * sr]
    sos.append(signal.butter(2, chan.highpass, "highpass", fs=sr, output="sos"))
    if chan.lowpass < 0.45 * sr:
        sos.append(signal.butter(4, chan.lowpass, "lowpass", fs=sr, output="sos"))
    x = signal.sosfilt(np.concatenate(sos), x)
    # Noise at the session SNR (+-3 dB per utterance), measured against the whole utterance.
    snr = chan.snr_db + rng.uniform(-3.0, 3.0)
    noise = signal.lfilter([1.0], [1.0, -chan.noise_colour], rng.standard_normal(len(x)))
    noise *= np.sqrt(np.mean(x**2) / np.mean(noise**2) / 10.0 ** (snr / 10.0))
    x = x + noise
    x *= 10.0 ** (chan.level_db / 20.0) / np.sqrt(np.mean(x**2))
    peak = np.max(np.abs(x))
    if peak > 0.99:  # a louder session would clip: the recorder's gain is lowered instead
        x *= 0.99 / peak
    return x


def utterance_audio(seed: int, speaker: int, video: int, utterance: int, *,
                    seconds: tuple[float, float] = (2.0, 4.0), sample_rate: int = 16000,
                    voices: str = "default", channel: str = "varied") -> np.ndarray:
    """The 16-bit PCM samples of one utterance (as written to disk). Returns (T,) int16."""
    spk = draw_speaker(seed, speaker, voices)
    chan = draw_channel(seed, speaker, video, channel)
    rng = _rng(seed, _UTTERANCE, speaker, video, utterance)
    n = int(round(rng.uniform(*seconds) * sample_rate))
    wave = apply_channel(synthesise(spk, chan, rng, n, sample_rate), chan, rng, sample_rate)
    return np.clip(np.round(wave * 32767.0), -32768, 32767).astype(np.int16)
