"""The record a model file rebuilds its model from, and the one conversion of older records.

A model (the part after the backbone) is described by plain containers::

    {"head": {"name": a name of mrlcache.models.HEADS, "args": its constructor arguments},
     "streams": None                                  # the head reads the pooled vector
             or {"groups", "fusion", "encoder_dim"}}  # a StreamModel (encoders, fusion, this head)

:func:`record_of` writes it, :func:`build` is the one path back (``HEADS[name](**args)``, inside
a :class:`~mrlcache.models.streams.StreamModel` when ``streams`` is given). The sizes, the
pooled width and the cached streams the model reads are all in it once (``dims`` in the
head's args; a model's ``inputs`` follow from its groups).

:func:`upgrade` turns a version 1 file (``dims``, ``pooled_dim`` and ``inputs`` beside a
``head`` entry naming ``mrl`` or ``streams``, or no ``head`` entry at all in the first
files) into this record: the only place older files are read differently.
"""

from __future__ import annotations

VERSION = 2  # the model file's layout; load_model reads 1 and 2
READS = (1, 2)


def record_of(model) -> dict:
    """The record of a head or StreamModel (plain containers)."""
    from mrlcache.models import head_name

    if hasattr(model, "record"):  # a StreamModel
        return model.record()
    return {"head": {"name": head_name(model), "args": model.args()}, "streams": None}


def upgrade(obj: dict) -> dict:
    """A model file's dict in the current layout (version 1 files converted; others returned as they are)."""
    if obj.get("version") != 1:
        return obj
    obj = dict(obj)
    entry = obj.pop("head", None) or {"name": "mrl", "args": {"pooled_dim": obj["pooled_dim"], "dims": obj["dims"]}}
    dims, pooled_dim = obj.pop("dims", None), obj.pop("pooled_dim", None)
    obj.pop("inputs", None)
    if entry["name"] == "streams":
        spec = entry["args"]
        obj["head"] = {"name": spec["head"], "args": {**spec["head_args"], "dims": spec["head_args"].get("dims", dims)}}
        obj["streams"] = {"groups": spec["groups"], "fusion": spec.get("fusion"),
                          "encoder_dim": spec.get("encoder_dim", 256)}
    else:
        args = dict(entry["args"])
        args.setdefault("dims", dims)
        if entry["name"] == "mrl":
            args.setdefault("pooled_dim", pooled_dim)
        obj["head"], obj["streams"] = {"name": entry["name"], "args": args}, None
    obj["version"] = VERSION
    return obj


def build(record: dict):
    """The model of ``record`` (fresh weights): ``HEADS[name](**args)``, or a StreamModel around it.

    Raises ValueError (or TypeError for arguments the class does not take) naming the problem.
    """
    from mrlcache.models import head_class

    head = record["head"]
    if record.get("streams") is None:
        return head_class(head["name"])(**head["args"])
    from mrlcache.models.streams import StreamModel

    streams = record["streams"]
    return StreamModel(streams["groups"], head["name"], head["args"], fusion=streams.get("fusion"),
                       encoder_dim=streams.get("encoder_dim", 256))
