"""Inference modules, below training: what a model file holds and what ``export`` writes.

- ``matryoshka.py``: the Matryoshka head (BatchNorm + linear; every size a prefix);
- ``ecapa.py``: ECAPA-TDNN over frames, ending in the Matryoshka projection;
- ``fusion.py``: stream encoders and fusions;
- ``streams.py``: :class:`~mrlcache.models.streams.StreamModel`, encoders + fusion + head on streams;
- ``model.py``: the deployable model (``MRLModel``, ``save_model``, ``load_model``).

Nothing here imports :mod:`mrlcache.fit` (tests/models/test_imports.py checks it): the
losses, the loop and the schedules that train these modules live there.
"""
