"""Vectors made by other toolkits, read into (ids, array, speakers).

Every reader returns ``(ids, array, labels)``: ``ids`` a list of N utterance ids,
``array`` (N, D) or (N, K, D) float (K views or layers, see ``layout`` in
:func:`read_vectors`), ``labels`` a list of N speaker names stored in the file, or None.

Inputs (by path): ``.npy`` + ids file, ``.npz``, ``.pt``/``.pth`` (loaded with
``torch.load(weights_only=True)`` only: a pickle that carries code is refused before
anything in it runs), Kaldi ``.ark``/``.scp`` (parsed by ``interop/kaldi.py``: no scp
entry runs a command, no record is unpickled), and a folder of one ``.npy`` per
utterance (SpeechBrain style; the id is the path relative to the folder without
``.npy``). Bad input is refused, naming the offending ids, never dropped.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from mrlcache.interop.errors import InteropError  # noqa: F401 (raised here; part of this API)
from mrlcache.runtime import check_regular, open_regular, read_text

# Keys looked for in .npz files and in .pt dicts of arrays, in this order.
VECTOR_KEYS = ("vectors", "embeddings", "embedding", "xvectors", "x")
ID_KEYS = ("ids", "utt_ids", "utts", "keys")
LABEL_KEYS = ("labels", "speakers", "spk", "speaker")
LAYOUTS = ("views", "layers")


def shown(items, limit: int = 5) -> str:
    """'3 ids: 'a', 'b', 'c'' style list of the first few offending items and their count."""
    items = list(items)
    head = ", ".join(repr(i) for i in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)}: {head}{more}"


# ---------------------------------------------------------------------------- side files


def read_ids(path) -> list[str]:
    """Utterance ids, one per line (surrounding whitespace stripped; no blank lines inside)."""
    path = Path(path)
    try:
        lines = read_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InteropError(f"--ids {path}: unreadable ({err})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    ids = [line.strip() for line in lines]
    blank = [i + 1 for i, u in enumerate(ids) if not u]
    if blank:
        raise InteropError(f"--ids {path}: blank lines {blank[:5]}; give one utterance id per line")
    return ids


def read_utt2spk(path) -> dict[str, str]:
    """Kaldi ``utt2spk``: lines 'utt_id speaker'; an utterance given twice is refused."""
    path = Path(path)
    out: dict[str, str] = {}
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as err:
        raise InteropError(f"--utt2spk {path}: unreadable ({err})") from None
    twice = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise InteropError(f"--utt2spk {path}: line {n} is not 'utt_id speaker': {line!r}")
        utt, spk = fields
        if utt in out and out[utt] != spk:
            twice.append(utt)
        out[utt] = spk
    if twice:
        raise InteropError(f"--utt2spk {path}: utterances with two speakers {shown(twice)}")
    return out


def speakers_for(ids, labels=None, utt2spk=None, source="") -> list[str] | None:
    """Speaker of every id: from ``utt2spk``, else the file's labels, else the VoxCeleb layout.

    The VoxCeleb layout (``speaker/video/utt``) gives the first path component; it is used
    only when every id has one. Returns None when no rule applies (an unlabelled set).

    Raises:
        InteropError: ids missing from utt2spk, or only some ids in the VoxCeleb layout.
    """
    if utt2spk is not None:
        missing = [u for u in ids if u not in utt2spk]
        if missing:
            raise InteropError(f"--utt2spk: utterance ids of {source} missing from it {shown(missing)}")
        return [utt2spk[u] for u in ids]
    if labels is not None:
        return [str(s) for s in labels]
    flat = [u for u in ids if "/" not in u.strip("/")]
    if len(flat) == len(ids):
        return None
    if flat:
        raise InteropError(
            f"{source}: some ids are in the VoxCeleb layout speaker/video/utt and some are not "
            f"{shown(flat)}; give --utt2spk to name every speaker"
        )
    return [u.strip("/").split("/", 1)[0] for u in ids]


# ---------------------------------------------------------------------------- checks


def _stack(ids, arrays, source: str) -> np.ndarray:
    """Per-utterance arrays (D,) or (K, D) of one shape -> (N, D) or (N, K, D)."""
    shapes = [np.shape(a) for a in arrays]
    common = Counter(shapes).most_common(1)[0][0]
    odd = [f"{u} {s}" for u, s in zip(ids, shapes) if s != common]
    if odd:
        raise InteropError(
            f"{source}: ragged vectors: most have shape {common}, these differ {shown(odd)}; "
            f"every utterance needs the same shape"
        )
    return np.stack([np.asarray(a) for a in arrays])


def check_vectors(ids, array, labels, source: str):
    """Refuse what cannot be a set of embeddings; returns (ids, array, labels) unchanged.

    Refused: a count of ids other than the rows, empty or duplicate ids, ids holding tabs
    or newlines, non-float arrays, a shape other than (N, D) or (N, K, D), NaN/Inf rows,
    all-zero vectors (cosine scoring needs a direction).
    """
    array = np.asarray(array)
    ids = [str(u) for u in ids]
    if array.ndim not in (2, 3):
        raise InteropError(
            f"{source}: array of shape {array.shape}; expected (N, D) vectors, (N, V, D) views "
            f"or (N, L, D) layer stacks"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InteropError(f"{source}: array of dtype {array.dtype}; embeddings must be floating point")
    if len(ids) != array.shape[0]:
        raise InteropError(f"{source}: {len(ids)} ids for {array.shape[0]} vectors; give one id per row")
    if array.shape[0] == 0 or array.shape[-1] == 0 or (array.ndim == 3 and array.shape[1] == 0):
        raise InteropError(f"{source}: no vectors (shape {array.shape})")
    if labels is not None and len(labels) != len(ids):
        raise InteropError(f"{source}: {len(labels)} labels for {len(ids)} ids")
    empty = [i for i, u in enumerate(ids) if not u.strip()]
    if empty:
        raise InteropError(f"{source}: empty ids at rows {shown(empty)}")
    unstorable = [u for u in ids if any(c in u for c in "\t\n\r")]
    if unstorable:
        raise InteropError(f"{source}: ids with tabs or newlines cannot be stored {shown(unstorable)}")
    dup = [u for u, c in Counter(ids).items() if c > 1]
    if dup:
        raise InteropError(f"{source}: duplicate ids {shown(dup)}; each utterance must appear once")
    bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    if bad.any():
        raise InteropError(f"{source}: NaN or Inf in the vectors of ids {shown(ids[i] for i in np.flatnonzero(bad))}")
    zero = ~array.reshape(len(ids), -1, array.shape[-1]).any(axis=2).all(axis=1)  # a vector of zeros: no direction
    if zero.any():
        raise InteropError(f"{source}: all-zero vectors (no direction to score by cosine) of ids "
                           f"{shown(ids[i] for i in np.flatnonzero(zero))}; remove them or fix their export")
    return ids, array, labels


# ---------------------------------------------------------------------------- formats


def ids_file_for(path, ids_file=None):
    """The ids file used for ``path``: ``ids_file``, or for X.npy an ``X.ids.txt`` beside it.

    ``X.ids.txt`` is what ``mrlcache embed --out X.npy`` and ``export-vectors`` write.
    """
    path = Path(path)
    if ids_file is None and path.suffix.lower() == ".npy":
        beside = path.with_name(path.stem + ".ids.txt")
        return beside if beside.is_file() else None
    return ids_file


def _npy(path: Path, ids_file) -> tuple:
    ids_file = ids_file_for(path, ids_file)
    if ids_file is None:
        raise InteropError(f"{path}: a .npy array needs --ids FILE (one utterance id per line)")
    return read_ids(ids_file), load_npy(path), None


def _pick(container: dict, keys):
    found = [k for k in keys if k in container]
    return container[found[0]] if found else None


def _npz(path: Path, ids_file) -> tuple:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise InteropError(
            f"{path}: unreadable .npz ({err}); ids and labels must be string arrays, not objects"
        ) from None
    vectors = _pick(data, VECTOR_KEYS)
    if vectors is None:
        others = [k for k in data if k not in ID_KEYS + LABEL_KEYS]
        if len(others) != 1:
            raise InteropError(
                f"{path}: arrays {sorted(data)}; name the vectors one of {', '.join(VECTOR_KEYS)}"
            )
        vectors = data[others[0]]
    ids = _pick(data, ID_KEYS)
    if ids_file is not None:
        ids = read_ids(ids_file)
    elif ids is None:
        raise InteropError(f"{path}: no ids array ({', '.join(ID_KEYS)}); add one or give --ids FILE")
    return _strings(ids, "ids", path), vectors, _strings(_pick(data, LABEL_KEYS), "labels", path)


def _strings(values, what: str, source) -> list[str] | None:
    """Ids or labels as a list of str: bytes decoded as UTF-8, numbers written out.

    Raises:
        InteropError: not one flat list (an (N, 1) array would become "['id']" strings),
            or bytes that are not UTF-8.
    """
    if values is None:
        return None
    if hasattr(values, "tolist"):
        shape, values = np.shape(values), values.tolist()
        if len(shape) != 1:
            raise InteropError(f"{source}: {what} of shape {shape}; give a flat list of {shape[0] if shape else 1} strings")
    nested = [v for v in values if isinstance(v, (list, tuple, dict))]
    if nested:
        raise InteropError(f"{source}: {what} hold lists {shown(nested)}; give a flat list of {len(values)} strings")
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except UnicodeDecodeError as err:
        raise InteropError(f"{source}: {what} are bytes that are not UTF-8 ({err})") from None


def _numpy(x, source=""):
    """A tensor as a numpy array; sparse, meta and quantized tensors are refused in one line."""
    import torch

    if isinstance(x, torch.Tensor):
        odd = ("sparse" if x.layout != torch.strided else "meta (no data)" if x.is_meta
               else "quantized" if x.is_quantized else "complex" if x.is_complex() else None)
        if odd:
            raise InteropError(f"{source}: holds a {odd} tensor; save plain dense float tensors "
                               f"(tensor.to_dense().float() or dequantize())")
        return x.detach().cpu().float().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    return np.asarray(x)


def load_npy(path) -> np.ndarray:
    """``np.load`` of a plain array, its header checked against the file size before reading.

    A header may claim any shape: checking first means a lie is one line, not an
    allocation of what it claims.
    """
    try:
        with open_regular(path) as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            have = os.fstat(f.fileno()).st_size - f.tell()
            if dtype.hasobject:
                raise ValueError("it holds Python objects, which could run code when loaded")
            if need != have:
                raise ValueError(f"its header claims shape {shape} of {dtype} ({need} bytes) but "
                                 f"{have} bytes follow; the file is truncated or not what it says")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InteropError(f"{path}: not a plain numpy array ({err})") from None


def load_torch_safely(path: Path):
    """``torch.load(weights_only=True)``: tensors and plain containers only, no code runs."""
    import pickle

    import torch

    try:
        check_regular(path)
        with torch.sparse.check_sparse_tensor_invariants():  # a crafted sparse tensor fails here, not later
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        detail = next((line for line in reason if "Unsupported" in line or "GLOBAL" in line), reason[0] if reason else "")
        raise InteropError(
            f"{path}: refused: the file holds Python objects other than tensors and plain "
            f"containers, which could run code when loaded ({detail.strip()}); re-save it as a "
            f"dict of tensors (id -> tensor, or ids/embeddings/labels)"
        ) from None
    except Exception as err:  # torch raises many types for a file that is not a torch file
        raise InteropError(f"{path}: not a torch file ({type(err).__name__}: {err})") from None


def _pt(path: Path, ids_file) -> tuple:
    import torch

    obj = load_torch_safely(path)
    if isinstance(obj, torch.Tensor):
        if ids_file is None:
            raise InteropError(f"{path}: holds one tensor; give --ids FILE (one utterance id per line)")
        return read_ids(ids_file), _numpy(obj, path), None
    if not isinstance(obj, dict) or not obj:
        raise InteropError(
            f"{path}: holds {type(obj).__name__}; expected a dict id -> tensor or a dict with "
            f"ids, embeddings and optional labels"
        )
    vectors = _pick(obj, VECTOR_KEYS)
    if vectors is not None:  # a dict of arrays: ids, vectors, labels
        ids = read_ids(ids_file) if ids_file is not None else _pick(obj, ID_KEYS)
        if ids is None:
            raise InteropError(f"{path}: no ids list ({', '.join(ID_KEYS)}); add one or give --ids FILE")
        return _strings(ids, "ids", path), _numpy(vectors, path), _strings(_pick(obj, LABEL_KEYS), "labels", path)
    not_tensor = [k for k, v in obj.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
    if not_tensor:
        raise InteropError(
            f"{path}: a dict id -> tensor, but these values are not tensors {shown(not_tensor)}; "
            f"or name the vectors one of {', '.join(VECTOR_KEYS)}"
        )
    ids = [str(k) for k in obj]
    return ids, _stack(ids, [_numpy(v, path) for v in obj.values()], str(path)), None


def _kaldi(path: Path, ids_file) -> tuple:
    from mrlcache.interop.kaldi import read_ark, read_scp

    try:
        items = read_scp(path) if path.suffix.lower() == ".scp" else read_ark(path)
    except InteropError:
        raise
    except Exception as err:  # kaldiio's decoders raise ValueError, AssertionError, struct errors...
        raise InteropError(f"{path}: unreadable Kaldi {path.suffix[1:]} ({type(err).__name__}: {err})") from None
    if not items:
        raise InteropError(f"{path}: no vectors")
    ids = [k for k, _ in items]
    return ids, _stack(ids, [np.asarray(v) for _, v in items], str(path)), None


def folder_npy_files(path: Path) -> list[Path]:
    """The .npy files under ``path``, sorted; links that leave it are refused, not followed.

    Raises:
        InteropError: a linked subfolder (its files would be read from elsewhere, or left
            out without a word) or a linked .npy file whose target is outside ``path``.
    """
    root = path.resolve()
    files = []
    for folder, dirs, names in os.walk(path):
        for d in dirs:
            if os.path.islink(os.path.join(folder, d)):
                raise InteropError(f"{Path(folder, d)}: a linked folder inside --vectors {path}; it is not "
                                   f"followed: copy its files in, or import it separately")
        for name in names:
            f = Path(folder, name)
            if f.suffix == ".npy":
                if f.is_symlink() and not f.resolve().is_relative_to(root):
                    raise InteropError(f"{f}: a link to {f.resolve()}, outside --vectors {path}; copy the file in")
                files.append(f)
    return sorted(files)


def _folder(path: Path, ids_file) -> tuple:
    files = folder_npy_files(path)
    if not files:
        raise InteropError(f"{path}: a folder with no .npy files; expected one .npy per utterance")
    ids, arrays = [], []
    for f in files:
        ids.append(f.relative_to(path).with_suffix("").as_posix())
        arrays.append(load_npy(f))
    return ids, _stack(ids, arrays, str(path)), None


# Suffix -> reader(path, ids_file) -> (ids, array, labels).
READERS = {".npy": _npy, ".npz": _npz, ".pt": _pt, ".pth": _pt, ".ark": _kaldi, ".scp": _kaldi}


def read_vectors(path, ids_file=None, layout: str | None = None):
    """Read vectors from any supported input; returns checked (ids, array, labels).

    Args:
        path: a file (.npy, .npz, .pt, .pth, .ark, .scp) or a folder of .npy files.
        ids_file: ids one per line, for inputs that do not carry ids (.npy, a bare tensor);
            overrides the ids stored in .npz/.pt dicts.
        layout: for (N, K, D) input, "views" (K crops of each utterance) or "layers" (K
            backbone layers). Required for such input; ignored for (N, D).

    Returns:
        ids (list of N str), array (N, D) or (N, K, D) in its stored float dtype, labels
        (list of N str, or None).
    """
    path = Path(path)
    if not path.exists():
        raise InteropError(f"--vectors {path}: no such file or folder")
    if layout is not None and layout not in LAYOUTS:
        raise InteropError(f"--layout {layout}: choose views or layers")
    if path.is_dir():
        reader = _folder
    else:
        try:
            check_regular(path, "--vectors")  # a FIFO would hang np.load or torch.load
        except OSError as err:
            raise InteropError(str(err)) from None
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise InteropError(
                f"--vectors {path}: unknown kind {path.suffix or '(no suffix)'}; give a .npy, .npz, "
                f".pt, .pth, .ark or .scp file, or a folder of .npy files"
            )
    ids, array, labels = check_vectors(*reader(path, ids_file), str(path))
    if array.ndim == 3 and layout is None:
        raise InteropError(
            f"{path}: array of shape {array.shape} (N, K, D): say what K is with --layout views "
            f"(crops of each utterance) or --layout layers (backbone layer stacks)"
        )
    return ids, array, labels
