"""SpeechBrain's ``hyperparams.yaml`` of an ECAPA-TDNN model folder, read as plain data.

The file's ``!new:``/``!ref``/``!name:`` tags are read as plain values with the safe
loader (nothing is constructed or imported); :func:`read_hyperparams` returns the
``embedding_model`` arguments after checking that the front end and normalisation are
the ones :mod:`mrlcache.backbone.ecapa_tdnn` implements.
"""

from __future__ import annotations

from pathlib import Path


class HyperparamsError(ValueError):
    """A hyperparams.yaml that cannot be read or asks for what is not implemented."""


def _load_tagged_yaml(text: str):
    """YAML with the safe loader, SpeechBrain's ``!new:``/``!ref``/``!name:`` tags read as plain data
    (nothing is constructed or imported)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def plain(loader, suffix, node):
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)

    Loader.add_multi_constructor("!", plain)
    return yaml.load(text, Loader=Loader)


def _ref(value, hparams):
    """Resolve a ``<name>`` reference to a top-level hyperparameter."""
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        return hparams.get(value[1:-1], value)
    return value


def read_hyperparams(path: Path) -> dict:
    """The ECAPA-TDNN arguments of a SpeechBrain hyperparams.yaml (``embedding_model``), checked.

    Raises:
        HyperparamsError: no embedding_model, or a front end / normalisation other than the one
            implemented (Fbank with only n_mels set; sentence mean normalisation without std).
    """
    import yaml

    try:
        hp = _load_tagged_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        why = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # YAML errors span lines
        raise HyperparamsError(f"{path}: cannot read ({why})") from None
    model = hp.get("embedding_model") if isinstance(hp, dict) else None
    if not isinstance(model, dict):
        raise HyperparamsError(f"{path}: no embedding_model entry (a SpeechBrain ECAPA-TDNN hyperparams.yaml has one)")
    args = {k: _ref(v, hp) for k, v in model.items()}
    features = {k: _ref(v, hp) for k, v in (hp.get("compute_features") or {}).items()}
    extra = sorted(set(features) - {"n_mels"})
    if extra:
        raise HyperparamsError(f"{path}: compute_features sets {extra}; only SpeechBrain's default Fbank with n_mels "
                          "is implemented")
    norm = hp.get("mean_var_norm") or {}
    if norm and (norm.get("norm_type", "global") != "sentence" or norm.get("std_norm", True)):
        raise HyperparamsError(f"{path}: mean_var_norm must be norm_type: sentence with std_norm: False (found {norm})")
    unsupported = sorted(set(args) - {"input_size", "channels", "kernel_sizes", "dilations", "attention_channels",
                                      "res2net_scale", "se_channels", "global_context", "lin_neurons", "device"})
    if unsupported:
        raise HyperparamsError(f"{path}: embedding_model sets {unsupported}; not supported")
    if "n_mels" in features and int(features["n_mels"]) != int(args.get("input_size", features["n_mels"])):
        raise HyperparamsError(f"{path}: n_mels {features['n_mels']} differs from input_size {args.get('input_size')}")
    return {k: v for k, v in args.items() if k != "device"}
