"""The frozen encoders mrlcache runs, by name: plain data, importable without torch.

Each entry is the module implementing the encoder and the names of its configurations
(random weights from a name: tests, benchmarks; published weights always carry their own
shapes). A new encoder is one module plus one line here. Every module but ReDimNet's
(whose loading predates the registry and lives in :mod:`mrlcache.backbone.loading`)
provides::

    NAME, CONFIGS (name -> config dict), ConfigError,
    build(config) -> nn.Module with features / frames / pooled / head / forward,
        model_config, pooled_dim, embed_dim, weights_sha256 and encoder = NAME,
    min_samples(config) -> int             # the shortest wave (samples) it takes, also model.min_samples
    UNSHAPED: config keys the weights' shapes do not tell (read from a file's model_config)
    recognises(state_dict) -> bool          # the published layout, told by its keys
    from_published(state_dict, path) -> (config, state_dict under the module's names)
    to_published(key) -> key               # optional: mrlcache's name -> the published one
    weights_file(path) -> Path              # optional: a model folder -> its weights file

and every model (ReDimNet's too) gives the ``layers`` stream and its exportable form::

    layer_dims -> (width of each layer,)   # stacked only when all are equal (else refused)
    layer_rate                              # frames per second at 16 kHz
    layer_frames(num_samples) -> int        # frames of the layers for a wave of num_samples
    layer_hop -> int | None                 # frames centred every layer_hop samples (T // hop + 1,
                                            # so windows concatenate exactly), else None (one pass)
    layer_outputs(wave) -> [L tensors (B, width, frames)]
    pooled_from_layers(outs) -> (B, pooled_dim), the same values as pooled(wave)
    exportable() -> nn.Module with pooled(wave), layer_outputs(wave) and min_samples, from
                    operations ONNX and TorchScript export (raises ValueError saying why not)
"""

BACKBONES = {
    "redimnet": ("mrlcache.backbone.redimnet", ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "S", "M")),
    "ecapa-tdnn": ("mrlcache.backbone.ecapa_tdnn", ("c1024", "c512")),
    "campplus": ("mrlcache.backbone.campplus", ("e192", "e512")),
}
DEFAULT_BACKBONE = "redimnet"


EXPORT_MIN_SAMPLES = 1600  # shortest wave an exported ECAPA-TDNN or CAM++ graph is declared for (0.1 s)


def exportable_copy(model):
    """A copy of an encoder whose own front end exports (ECAPA-TDNN, CAM++), declared for
    waves of at least EXPORT_MIN_SAMPLES or its own minimum."""
    import copy

    net = copy.deepcopy(model)
    net.min_samples = max(EXPORT_MIN_SAMPLES, int(model.min_samples))
    return net


def backbone_names() -> tuple[str, ...]:
    return tuple(BACKBONES)


def config_names(backbone: str) -> tuple[str, ...]:
    """Named configurations of ``backbone`` (ReDimNet's: its published variants)."""
    return BACKBONES[backbone][1]


def wave_minimum(model) -> tuple[int, str]:
    """(shortest wave in samples, who needs it) of a loaded backbone, for
    :func:`mrlcache.audio.check_length`: each encoder module's ``min_samples(config)``, kept
    on the model as ``min_samples``; ReDimNet's minimum for anything else (None, a stream model)."""
    from mrlcache.audio import MIN_SAMPLES

    if not hasattr(model, "min_samples"):
        return MIN_SAMPLES, "the model"
    return int(model.min_samples), f"the {getattr(model, 'encoder', DEFAULT_BACKBONE)} encoder"


def encoder_module(backbone: str):
    """The module implementing ``backbone`` (imports torch)."""
    import importlib

    if backbone not in BACKBONES:
        raise KeyError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
    return importlib.import_module(BACKBONES[backbone][0])
