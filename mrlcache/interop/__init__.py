"""Vectors in from other toolkits, vectors out to them (issue 13, items 1 and 3).

``read_vectors`` reads .npy/.npz/.pt/Kaldi ark+scp/a folder of .npy into checked
(ids, array, labels); ``import_vectors`` writes them as a regular cache;
``export_vectors`` reads a cache (raw, or through a fitted head) and ``write_vectors``
writes Kaldi ark+scp, .npz, .npy + ids or a folder of .npy. Formats, shapes and refusals:
docs/interop.md.
"""

from mrlcache.interop.readers import InteropError, read_ids, read_utt2spk, read_vectors, speakers_for
from mrlcache.interop.writers import FORMATS, export_vectors, import_vectors, output_paths, source_sha256, write_vectors

__all__ = [
    "FORMATS",
    "InteropError",
    "export_vectors",
    "import_vectors",
    "output_paths",
    "read_ids",
    "read_utt2spk",
    "read_vectors",
    "source_sha256",
    "speakers_for",
    "write_vectors",
]
