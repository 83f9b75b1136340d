"""Where a backbone's weights come from, as one record the cache and model.pt both carry.

A record has four plain fields (JSON in ``cache.json["backbone"]``, plain dict entries in
``model.pt["backbone"]``), and a fifth for encoders other than ReDimNet::

    {"source": "b2" | "/abs/path.pt" | "/abs/model-folder" | "random-init:b0",
     "train_type": "ptn", "dataset": "vox2",     # published weights; None otherwise
     "sha256": "...",                              # of the weights file's bytes
     "encoder": "ecapa-tdnn"}                      # absent (None) for ReDimNet

(the encoder's configuration is the ``model_config`` stored beside the record). Records
without ``encoder`` (every record before there were other encoders) are ReDimNet's.

so fit, eer and embed find the weights and check them without parsing strings. Caches of
format 1 recorded ``weights_source`` as a packed string ("b2-vox2-ptn", a path, or
"random-init:b0:seed=0") and ``weights_sha256`` beside it: :func:`convert_v1_meta` is the
one place that reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

RANDOM_PREFIX = "random-init:"


class RecordError(ValueError):
    """A backbone record that is not a dict of the four known fields."""


@dataclass(frozen=True)
class BackboneRecord:
    """Where a backbone's weights come from, and the SHA-256 that identifies them.

    Attributes:
        source: a published variant name ("b2"), an absolute path to a published-format
            file, "random-init:NAME" (random weights, saved as CACHE/backbone.pt), or None
            when unknown (e.g. a model saved from an in-memory backbone).
        train_type, dataset: which published file a variant name means ("ptn", "vox2");
            None for files and random weights.
        sha256: SHA-256 of the weights in the published format (the file's bytes).
        encoder: the encoder's registry name (:mod:`mrlcache.backbone.registry`); None for ReDimNet.
    """

    source: str | None
    train_type: str | None = None
    dataset: str | None = None
    sha256: str | None = None
    encoder: str | None = None

    @classmethod
    def published(cls, variant: str, train_type: str = "ptn", dataset: str = "vox2", sha256=None):
        """Published weights, e.g. b2 / ptn / vox2 (the file b2-vox2-ptn.pt)."""
        return cls(variant, train_type, dataset, sha256)

    @classmethod
    def file(cls, path, sha256=None):
        """A local published-format file (recorded by its absolute path)."""
        from pathlib import Path

        return cls(str(Path(path).resolve()), None, None, sha256)

    @classmethod
    def random_init(cls, variant: str, sha256=None):
        """Random weights of a named configuration (seeded by the command's --seed)."""
        return cls(RANDOM_PREFIX + variant, None, None, sha256)

    @property
    def is_random(self) -> bool:
        return bool(self.source) and self.source.startswith(RANDOM_PREFIX)

    def with_sha256(self, sha256: str | None) -> BackboneRecord:
        return replace(self, sha256=sha256)

    def of_model(self, model) -> BackboneRecord:
        """This record with ``model``'s SHA-256 and encoder name (None for ReDimNet)."""
        encoder = getattr(model, "encoder", None)
        return replace(self, sha256=model.weights_sha256, encoder=None if encoder == "redimnet" else encoder)

    def to_dict(self) -> dict:
        """The fields as a plain dict; ``encoder`` only when set (ReDimNet records keep their four keys)."""
        data = asdict(self)
        if data["encoder"] is None:
            del data["encoder"]
        return data

    @classmethod
    def from_dict(cls, data) -> BackboneRecord:
        """The record of a dict holding some of the fields (missing ones are None).

        Raises:
            RecordError: not a dict, an unknown key, or a field that is not a string or None.
        """
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise RecordError(f"a backbone record must be a dict with {', '.join(names)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(names))
        bad = [k for k in names if data.get(k) is not None and not isinstance(data[k], str)]
        if unknown or bad:
            raise RecordError(f"backbone record: unknown keys {unknown}, non-string values {bad}; "
                              f"expected {', '.join(names)}")
        return cls(**{k: data.get(k) for k in names})

    @classmethod
    def from_meta(cls, meta: dict) -> BackboneRecord | None:
        """The record of a cache's settings (format 1 converted); None if it names no backbone."""
        meta = convert_v1_meta(meta)
        if meta.get("backbone") is None:
            return None
        return cls.from_dict(meta["backbone"])


def convert_v1_meta(meta: dict) -> dict:
    """Cache settings of format 1 -> the same settings with a ``backbone`` record.

    Format 1 recorded ``weights_source`` (packed: "b2-vox2-ptn", an absolute path, or
    "random-init:b0:seed=0"; an empty string when unknown) and ``weights_sha256``; both are
    replaced by ``backbone``. Settings that already have a ``backbone`` (or neither key) are
    returned unchanged. A packed string that is none of the three forms is kept as the
    source, for the loader to refuse by name.
    """
    if "backbone" in meta or not {"weights_source", "weights_sha256"} & set(meta):
        return meta
    meta = dict(meta)
    packed = str(meta.pop("weights_source", "") or "")
    sha = meta.pop("weights_sha256", None)
    if packed.startswith(RANDOM_PREFIX):
        variant = packed[len(RANDOM_PREFIX):].split(":", 1)[0]  # the seed is the cache's own "seed"
        record = BackboneRecord.random_init(variant, sha)
    elif "/" in packed or packed.endswith(".pt"):
        record = BackboneRecord(packed, None, None, sha)
    elif packed.count("-") >= 2:
        # "{variant}-{dataset}-{train_type}": variants and train types have no "-".
        variant, _, rest = packed.partition("-")
        dataset, _, train_type = rest.rpartition("-")
        record = BackboneRecord.published(variant, train_type, dataset, sha)
    else:
        record = BackboneRecord(packed or None, None, None, sha)
    meta["backbone"] = record.to_dict()
    return meta
