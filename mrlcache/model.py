"""The deployable model moved to :mod:`mrlcache.models.model`; this name stays for scripts that import it.

Use ``from mrlcache import load_model`` (or :mod:`mrlcache.models.model`) in new code.
"""

from mrlcache.models.model import (NO_CALIBRATION, ModelError, MRLModel, Verification, calibration_path,  # noqa: F401
                                   load_model, save_model)
