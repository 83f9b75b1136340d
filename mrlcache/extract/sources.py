"""What each audio file was when its vectors were extracted, so a rerun notices a replaced file.

``sources.tsv`` in the cache holds, per manifest row: utt_id, size in bytes, modification
time (ns) and a cheap content hash (SHA-256 of the size, the first and the last 4 KiB).
A rerun (resume or a finished cache) compares every file: the same size and time pass at
once; otherwise the size and the hash must match, so data copied elsewhere (new times)
passes and a file replaced by other audio is refused, naming it. Hashing reads 8 KiB per
file, once when the cache is made and again only for files whose time changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mrlcache.extract.config import ExtractError

SOURCES_FILE = "sources.tsv"
HEADER = "utt_id\tsize\tmtime_ns\thead_tail_sha256\n"
EDGE = 4096


def content_hash(path, size: int) -> str:
    """SHA-256 of the size and the first and last EDGE bytes: cheap, and moved by any re-encode."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(EDGE))
        if size > 2 * EDGE:
            f.seek(size - EDGE)
        h.update(f.read(EDGE))
    return h.hexdigest()


def _row(utt) -> str:
    try:
        st = os.stat(utt.path)
        fields = (st.st_size, st.st_mtime_ns, content_hash(utt.path, st.st_size))
    except OSError:  # unreadable now: extract records it as skipped; nothing to compare later
        fields = (-1, -1, "")
    return f"{utt.utt_id}\t{fields[0]}\t{fields[1]}\t{fields[2]}\n"


def check_sources(out: Path, utterances) -> None:
    """Record the files on the first run; on a rerun refuse any that changed since.

    Raises:
        ExtractError: a file whose size or content differs from the recorded one.
    """
    from mrlcache.runtime import write_exclusive

    path = Path(out) / SOURCES_FILE
    if not path.exists():
        write_exclusive(path, HEADER + "".join(_row(u) for u in utterances))
        return
    recorded = {}
    for line in path.read_text().splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) == 4 and fields[1].lstrip("-").isdigit() and fields[2].lstrip("-").isdigit():
            recorded[fields[0]] = (int(fields[1]), int(fields[2]), fields[3])
    changed = []
    for utt in utterances:
        old = recorded.get(utt.utt_id)
        if old is None or old[0] < 0:
            continue  # not recorded, or unreadable then: nothing to compare with
        try:
            st = os.stat(utt.path)
        except OSError:
            continue  # missing now: extract reports it when it decodes the file
        if (st.st_size, st.st_mtime_ns) == old[:2]:
            continue
        if st.st_size != old[0] or content_hash(utt.path, st.st_size) != old[2]:
            changed.append(utt)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ExtractError(f"{changed[0].path}: changed since its vectors were extracted into {out}{more}; "
                           f"use --overwrite to extract again, or restore the file")
