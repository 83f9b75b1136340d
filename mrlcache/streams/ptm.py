"""Pretrained speech models (PTMs) as frozen backbones: their 13 hidden states per frame.

WavLM Base+ (Chen et al., IEEE JSTSP 2022), HuBERT Base (Hsu et al., IEEE/ACM TASLP
2021) and wav2vec 2.0 Base (Baevski et al., NeurIPS 2020), built and loaded through
torchaudio: ``torchaudio.pipelines`` bundles for the published weights (downloaded once
into the torch hub cache, ``~/.cache/torch/hub/checkpoints``), ``torchaudio.models``
builders for random initialisation, which only happens on explicit request.

Hidden states (the ``layers`` stream of a PTM): 13 tensors (B, 768, T'), state 0 being the
input of the first transformer layer (CNN features -> projection -> convolutional
positional embedding, as torchaudio computes it) and states 1..12 the outputs of the 12
transformer layers (equal to torchaudio's ``extract_features``). T' = (T - 400) // 320 + 1
frames at 16 kHz: 50 frames per second.
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
import torchaudio
from torch import nn


class PTMError(RuntimeError):
    """A PTM that cannot be built or loaded (unknown name, offline, bad weights file)."""


@dataclass(frozen=True)
class PTMSpec:
    bundle: str  # attribute of torchaudio.pipelines
    builder: str  # function of torchaudio.models (random initialisation)


PTMS = {
    "wavlm-base-plus": PTMSpec("WAVLM_BASE_PLUS", "wavlm_base"),
    "hubert-base": PTMSpec("HUBERT_BASE", "hubert_base"),
    "wav2vec2-base": PTMSpec("WAV2VEC2_BASE", "wav2vec2_base"),
}
NUM_HIDDEN, HIDDEN_DIM, FRAME_RATE = 13, 768, 50


def weights_url(name: str) -> str:
    """Where torchaudio downloads the weights of ``name`` from."""
    path = getattr(torchaudio.pipelines, _spec(name).bundle)._path
    return path if path.startswith("https") else f"https://download.pytorch.org/torchaudio/models/{path}"


def _spec(name: str) -> PTMSpec:
    if name not in PTMS:
        raise PTMError(f"unknown PTM {name!r}: use one of {', '.join(PTMS)}")
    return PTMS[name]


class PTM(nn.Module):
    """A frozen torchaudio Wav2Vec2Model that returns every hidden state.

    Attributes: name, source ("torchaudio:<bundle>", the weights path, or "random-init"),
    num_layers (13), layer_dim (768), frame_rate (50).
    """

    def __init__(self, name: str, model: nn.Module, source: str):
        super().__init__()
        self.name, self.source = name, source
        self.model = model.eval()
        self.num_layers, self.layer_dim, self.frame_rate = NUM_HIDDEN, HIDDEN_DIM, FRAME_RATE

    def hidden_states(self, waves: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) at 16 kHz -> 13 tensors (B, 768, T'), channels first like the other streams."""
        if waves.ndim != 2:
            raise ValueError(f"expected waveforms of shape (B, T), got {tuple(waves.shape)}")
        encoder = self.model.encoder
        feats, _ = self.model.feature_extractor(waves.float(), None)  # (B, T', 512)
        x = encoder.transformer._preprocess(encoder.feature_projection(feats))  # (B, T', 768)
        states, bias = [x], None
        for layer in encoder.transformer.layers:
            x, bias = layer(x, None, position_bias=bias)  # WavLM threads its relative position bias
            states.append(x)
        return [s.transpose(1, 2) for s in states]

    # The backbone interface of the ``layers`` stream (mrlcache.backbone.registry): the
    # hidden states, one pass (frames every 320 samples of a 400-sample receptive field).
    layer_hop, layer_rate, layer_dims = None, float(FRAME_RATE), (HIDDEN_DIM,) * NUM_HIDDEN

    def layer_frames(self, num_samples: int) -> int:
        return max(0, (num_samples - 400) // 320 + 1)

    def layer_outputs(self, waves: torch.Tensor) -> list[torch.Tensor]:
        return self.hidden_states(waves)

    def exportable(self):
        raise ValueError(f"the pretrained transformer {self.name}'s front end is not rebuilt by mrlcache for "
                         "export; export a model on ReDimNet, ECAPA-TDNN, CAM++ or handcrafted streams")

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, 13, 768, T')."""
        return torch.stack(self.hidden_states(waves), dim=1)


def load_ptm(name: str, *, weights: str | Path | None = None, random_init: bool = False, seed: int = 0,
             device: str | torch.device = "cpu") -> PTM:
    """Build a PTM in eval mode.

    Args:
        name: one of PTMS ("wavlm-base-plus", "hubert-base", "wav2vec2-base").
        weights: a local state_dict file (``--ptm-weights PATH``) instead of the download.
        random_init: random weights (tests, benchmarks); ``seed`` makes them deterministic
            without touching the caller's global RNG state.
        device: where to put the model.
    Raises:
        PTMError: unknown name, both weights and random_init, a missing or mismatching
            weights file, a failed download (the message names --ptm-weights).
    """
    spec = _spec(name)
    if random_init and weights is not None:
        raise PTMError(f"{name}: give either --ptm-weights or --random-init, not both")
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, source = getattr(torchaudio.models, spec.builder)(), "random-init"
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise PTMError(f"--ptm-weights {path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PTMError(f"--ptm-weights {path}: not a torch state_dict file ({exc})") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model = getattr(torchaudio.models, spec.builder)()
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise PTMError(f"--ptm-weights {path}: does not hold {name} weights "
                           f"({str(exc).splitlines()[0]})") from exc
        source = str(path.resolve())
    else:
        bundle = getattr(torchaudio.pipelines, spec.bundle)
        try:
            model = bundle.get_model()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            raise PTMError(f"cannot download the {name} weights from {weights_url(name)} ({exc}); "
                           "download the file elsewhere and pass it with --ptm-weights PATH") from exc
        source = f"torchaudio:{spec.bundle}"
    for p in model.parameters():
        p.requires_grad_(False)
    return PTM(name, model, source).to(device)
