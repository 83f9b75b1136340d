"""Config dataclasses nested by component, and the one conversion between flat and nested options.

A config (:class:`mrlcache.fit.config.FitConfig`, :class:`mrlcache.extract.ExtractConfig`)
is a dataclass whose fields are groups, one dataclass per component (head, loss, optimiser,
...), each field declared once with its default, range and choices (:mod:`mrlcache.ranges`).
Every field also has a *key*: the flat name users type (``--lr``, ``lr:`` in a YAML file,
``fit(..., lr=...)`` in Python), unique across the groups. It is the field's name unless
the field declares another (``head.name`` is ``head``, as ``--head`` says).

:func:`flatten` is the one place where option mappings are converted: it reads the nested
form (``{"optim": {"lr": 0.1}}``), the flat form (``{"lr": 0.1}``, what every version
before the nesting wrote in run directories and YAML files) or a mix, into flat keys.
:func:`build` makes the nested config from flat keys, :func:`nested` writes it back as
plain data. This module imports neither torch nor click.
"""

from __future__ import annotations

import dataclasses


def key_of(field: dataclasses.Field) -> str:
    """The flat name of a field: its declared ``key``, else its name."""
    return field.metadata.get("key", field.name)


def groups(cls) -> dict[str, type]:
    """{group field name: its dataclass} of a nested config class."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(f.default_factory)}


def leaves(cls) -> dict[str, tuple[str | None, dataclasses.Field]]:
    """{flat key: (group name or None, field)} of every option of ``cls``, groups walked in order."""
    out = {}
    for f in dataclasses.fields(cls):
        sub = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        for g in (dataclasses.fields(sub) if sub else (f,)):
            key = key_of(g)
            if key in out:
                raise TypeError(f"{cls.__name__}: option {key!r} is declared twice")
            out[key] = (f.name if sub else None, g)
    return out


def flatten(cls, data: dict, error=ValueError) -> dict:
    """Option mapping in the nested form, the flat form or a mix -> flat keys (the one conversion).

    A group key whose value is a mapping is expanded into its fields' keys (a field by its
    name or its key, ``-`` read as ``_``); other keys pass through as they are, for the caller to accept or
    refuse. An option given twice (flat and nested) raises ``error``.
    """
    subs = groups(cls)
    out, seen = {}, {}

    def put(key, value, where):
        if key in out:
            raise error(f"{seen[key]} and {where} set the same option; keep one")
        out[key], seen[key] = value, where

    for key, value in data.items():
        sub = subs.get(key)
        if sub is not None and isinstance(value, dict):
            names = {g.name: key_of(g) for g in dataclasses.fields(sub)}
            names.update({k: k for k in names.values()})
            for name, v in value.items():
                name = str(name).replace("-", "_")  # crop-seconds as on the command line
                if name not in names:
                    known = ", ".join(sorted(set(names.values())))
                    raise error(f"{key}.{name}: not an option of {key} (it has {known})")
                put(names[name], v, f"{key}.{name}")
        else:
            put(key, value, key)
    return out


def build(cls, options: dict):
    """The nested config ``cls`` of flat ``options`` (keys of :func:`leaves`; others raise TypeError)."""
    table = leaves(cls)
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)}")
    parts: dict[str | None, dict] = {}
    for key, value in options.items():
        group, f = table[key]
        parts.setdefault(group, {})[f.name] = value
    args = {g: sub(**parts.get(g, {})) for g, sub in groups(cls).items()}
    return cls(**args, **parts.get(None, {}))


def flat(obj) -> dict:
    """{flat key: value} of a nested config instance (values as they are)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and f.name in groups(type(obj)):
            out.update({key_of(g): getattr(value, g.name) for g in dataclasses.fields(value)})
        else:
            out[key_of(f)] = value
    return out


def plain(value):
    """A value as YAML/JSON data: tuples as lists."""
    return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def nested(obj) -> dict:
    """The nested config as plain data ({group: {field: value}}, tuples as lists): what run files store."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and f.name in groups(type(obj)):
            out[f.name] = {g.name: plain(getattr(value, g.name)) for g in dataclasses.fields(value)}
        else:
            out[f.name] = plain(value)
    return out


def field_of(cls, key: str) -> dataclasses.Field:
    """The field of ``cls`` (nested or not) whose flat key is ``key``; KeyError otherwise."""
    if any(dataclasses.is_dataclass(f.default_factory) for f in dataclasses.fields(cls)):
        return leaves(cls)[key][1]
    return {key_of(f): f for f in dataclasses.fields(cls)}[key]
