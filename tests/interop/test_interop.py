"""mrlcache.interop: every input form of import, each refusal, and the export writers."""

from __future__ import annotations

import hashlib
import json
import os

import kaldiio
import numpy as np
import pytest
import torch

from mrlcache import cache as cache_mod
from mrlcache.interop import InteropError, export_vectors, import_vectors, read_vectors, write_vectors

IDS = [f"id{s:05d}/vid{u % 2}/{u:05d}" for s in range(3) for u in range(3)]  # VoxCeleb layout
SPEAKERS = [u.split("/")[0] for u in IDS]


def vectors(n=len(IDS), d=6, seed=0, views=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, d) if views is None else (n, views, d)
    return rng.standard_normal(shape).astype(np.float32)


def npy_input(tmp_path, x, ids=IDS, name="emb"):
    np.save(tmp_path / f"{name}.npy", x)
    (tmp_path / f"{name}.ids").write_text("\n".join(ids) + "\n")
    return tmp_path / f"{name}.npy", tmp_path / f"{name}.ids"


def imported(tmp_path, src, **kw):
    out = tmp_path / "cache"
    import_vectors(src, out, dtype=kw.pop("dtype", "float32"), **kw)
    return cache_mod.open(out)


def by_id(c) -> dict:
    x = c.read("pooled")  # (N, V, D)
    return {u: x[i] for i, u in enumerate(c.utterances)}


# ---------------------------------------------------------------------------- inputs


def test_npy_with_ids_file_makes_a_stamped_cache(tmp_path):
    x = vectors()
    src, ids = npy_input(tmp_path, x)
    c = imported(tmp_path, src, ids_file=ids, name="wavlm-sv", shard_size=4)
    assert c.utterances == IDS and c.speakers == SPEAKERS
    assert np.array_equal(c.read("pooled", view=0), x)
    assert len(list(c.iter_shards())) == 3  # 9 vectors in shards of 4
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    meta = json.loads((c.path / "cache.json").read_text())
    assert meta["mode"] == "imported"
    assert meta["backbone"] == {"source": "imported:wavlm-sv", "train_type": None, "dataset": None, "sha256": sha}
    assert meta["imported"]["sha256"] == sha and meta["imported"]["name"] == "wavlm-sv"
    assert meta["imported"]["ids_sha256"] == hashlib.sha256(ids.read_bytes()).hexdigest()
    assert (meta["pooled_dim"], meta["views"], meta["dtype"]) == (6, 1, "float32")


def test_npy_finds_the_ids_file_embed_writes_beside_it(tmp_path):
    x = vectors()
    np.save(tmp_path / "emb.npy", x)
    (tmp_path / "emb.ids.txt").write_text("\n".join(IDS) + "\n")
    ids, array, labels = read_vectors(tmp_path / "emb.npy")
    assert ids == IDS and np.array_equal(array, x) and labels is None


def test_npy_without_ids_is_refused(tmp_path):
    np.save(tmp_path / "emb.npy", vectors())
    with pytest.raises(InteropError, match="needs --ids"):
        read_vectors(tmp_path / "emb.npy")


def test_float16_default_rounds_like_extract(tmp_path):
    x = vectors()
    src, ids = npy_input(tmp_path, x)
    c = imported(tmp_path, src, ids_file=ids, dtype="float16")
    assert c.dtype == np.float16
    assert np.array_equal(c.read("pooled", view=0), x.astype(np.float16).astype(np.float32))


def test_npz_labels_are_the_speakers(tmp_path):
    x = vectors()
    labels = [f"spk{i % 2}" for i in range(len(IDS))]
    np.savez(tmp_path / "v.npz", ids=np.array(IDS), embeddings=x, labels=np.array(labels))
    c = imported(tmp_path, tmp_path / "v.npz")
    assert c.speakers == labels
    assert np.array_equal(c.read("pooled", view=0), x)


def test_npz_byte_string_ids_and_labels_are_decoded(tmp_path):
    # h5py and numpy code often store strings as bytes (dtype S); str(b"x") would be "b'x'".
    x, labels = vectors(), [f"spk{i % 2}" for i in range(len(IDS))]
    np.savez(tmp_path / "v.npz", ids=np.array(IDS, dtype=bytes), vectors=x, labels=np.array(labels, dtype=bytes))
    torch.save({"ids": [u.encode() for u in IDS], "embeddings": torch.from_numpy(x)}, tmp_path / "v.pt")
    assert read_vectors(tmp_path / "v.npz")[::2] == (IDS, labels)
    assert read_vectors(tmp_path / "v.pt")[0] == IDS


@pytest.mark.parametrize("key", ["ids", "labels"])
def test_npz_ids_or_labels_of_more_than_one_dimension_are_refused(tmp_path, key):
    arrays = {"ids": np.array(IDS), "vectors": vectors(), "labels": np.array(SPEAKERS)}
    arrays[key] = arrays[key][:, None]  # (N, 1): str() of each row would be "['...']"
    np.savez(tmp_path / "v.npz", **arrays)
    with pytest.raises(InteropError, match=rf"v\.npz: {key} of shape \(9, 1\); give a flat list of {len(IDS)} strings"):
        read_vectors(tmp_path / "v.npz")


def test_pt_dict_of_tensors(tmp_path):
    x = vectors()
    ids = [f"utt{i}" for i in range(len(x))]  # no speaker folder: an unlabelled set
    torch.save({u: torch.from_numpy(v) for u, v in zip(ids, x)}, tmp_path / "v.pt")
    c = imported(tmp_path, tmp_path / "v.pt")
    assert c.utterances == ids and c.speakers == [""] * len(ids)
    assert np.array_equal(c.read("pooled", view=0), x)


def test_pth_dict_of_arrays_with_ids_and_labels(tmp_path):
    x = vectors()
    labels = ["a", "b", "c"] * 3
    torch.save({"ids": IDS, "embeddings": torch.from_numpy(x), "labels": labels}, tmp_path / "v.pth")
    ids, array, got = read_vectors(tmp_path / "v.pth")
    assert ids == IDS and got == labels and np.array_equal(array, x)


def test_pt_carrying_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"ids": ["a"], "embeddings": torch.zeros(1, 4), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InteropError, match="refused.*could run code"):
        read_vectors(tmp_path / "evil.pt")
    assert not marker.exists()
    # The file really is dangerous: an unrestricted load runs its payload.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_kaldi_ark_and_scp(tmp_path):
    x = vectors()
    kaldiio.save_ark(str(tmp_path / "xv.ark"), dict(zip(IDS, x)), scp=str(tmp_path / "xv.scp"))
    for name in ("xv.ark", "xv.scp"):
        ids, array, labels = read_vectors(tmp_path / name)
        assert ids == IDS and np.array_equal(array, x) and labels is None


@pytest.mark.parametrize("entry", ["touch {m} |", "| touch {m}", "-"])
def test_kaldi_scp_piped_commands_are_refused_before_they_run(tmp_path, monkeypatch, entry):
    marker = tmp_path / "pwned"
    kaldiio.save_ark(str(tmp_path / "xv.ark"), dict(zip(IDS, vectors())), scp=str(tmp_path / "xv.scp"))
    lines = (tmp_path / "xv.scp").read_text().splitlines()
    lines[1] = f"{IDS[1]} {entry.format(m=marker)}"
    (tmp_path / "evil.scp").write_text("\n".join(lines) + "\n")
    with pytest.raises(InteropError, match=r"evil\.scp:2: .*not a file.*run it once"):
        read_vectors(tmp_path / "evil.scp")
    assert not marker.exists()
    # An ark whose own name starts with '|' is opened as a file, not run by a shell.
    monkeypatch.chdir(tmp_path)
    odd = f"| touch {marker.name} ;.ark"
    kaldiio.save_ark(str(tmp_path / "plain.ark"), dict(zip(IDS, vectors())))
    os.replace(tmp_path / "plain.ark", tmp_path / odd)
    ids, _, _ = read_vectors(odd)
    assert ids == IDS and not marker.exists()


def test_folder_of_npy_ids_are_relative_paths(tmp_path):
    x = vectors()
    for u, v in zip(IDS, x):
        (tmp_path / "emb" / u).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "emb" / f"{u}.npy", v)
    (tmp_path / "emb" / "notes.txt").write_text("not a vector")
    c = imported(tmp_path, tmp_path / "emb")
    got = by_id(c)
    assert sorted(got) == sorted(IDS) and c.speakers == [u.split("/")[0] for u in c.utterances]
    assert all(np.array_equal(got[u][0], v) for u, v in zip(IDS, x))


def test_utt2spk_overrides_and_must_cover_every_id(tmp_path):
    src, ids = npy_input(tmp_path, vectors())
    (tmp_path / "utt2spk").write_text("".join(f"{u} s{i % 2}\n" for i, u in enumerate(IDS)))
    c = imported(tmp_path, src, ids_file=ids, utt2spk=tmp_path / "utt2spk")
    assert c.speakers == [f"s{i % 2}" for i in range(len(IDS))]
    (tmp_path / "short").write_text(f"{IDS[0]} s0\n")
    with pytest.raises(InteropError, match=r"missing from it 8: .*'id00000/vid1/00001'"):
        import_vectors(src, tmp_path / "c2", ids_file=ids, utt2spk=tmp_path / "short")
    assert not (tmp_path / "c2").exists()


def test_views_need_a_layout_and_are_stored_as_views(tmp_path):
    x = vectors(views=3)
    src, ids = npy_input(tmp_path, x)
    with pytest.raises(InteropError, match="--layout views"):
        read_vectors(src, ids)
    c = imported(tmp_path, src, ids_file=ids, layout="views")
    assert c.num_views == 3 and np.array_equal(c.read("pooled"), x)
    assert np.array_equal(c.read("pooled", view=2), x[:, 2])


def test_layer_stacks_become_the_layers_stream_of_per_layer_vectors(tmp_path):
    x = vectors(views=4)  # (N, L=4, D=6)
    src, ids = npy_input(tmp_path, x)
    c = imported(tmp_path, src, ids_file=ids, layout="layers")
    assert set(c.streams) == {"layers"}  # no pooled vector: the heads read the layers
    assert c.streams["layers"].kind == "vector" and list(c.streams["layers"].shape) == [4, 6]
    got = c.read("layers", view=0)  # (N, L, D) in cache order
    assert np.array_equal(got[c.index_of(IDS)], x)


# ---------------------------------------------------------------------------- refusals


def test_nan_and_inf_rows_are_named(tmp_path):
    x = vectors()
    x[2, 0], x[5, 3] = np.nan, np.inf
    src, ids = npy_input(tmp_path, x)
    with pytest.raises(InteropError, match=rf"NaN or Inf .* 2: '{IDS[2]}', '{IDS[5]}'"):
        import_vectors(src, tmp_path / "c", ids_file=ids)
    assert not (tmp_path / "c").exists()


def test_duplicate_ids_are_named_first_few_and_count(tmp_path):
    ids = [f"u{i % 2}" for i in range(len(IDS))]
    src, ids_file = npy_input(tmp_path, vectors(), ids=ids)
    with pytest.raises(InteropError, match=r"duplicate ids 2: 'u0', 'u1'"):
        read_vectors(src, ids_file)
    many = [f"d{i}" for i in range(7)] * 2
    src, ids_file = npy_input(tmp_path, vectors(n=14), ids=many, name="many")
    with pytest.raises(InteropError, match=r"duplicate ids 7: 'd0', .*'d4' and 2 more"):
        read_vectors(src, ids_file)


def test_ragged_vectors_are_named(tmp_path):
    x = vectors()
    torch.save({u: torch.from_numpy(v if i != 4 else v[:5]) for i, (u, v) in enumerate(zip(IDS, x))},
               tmp_path / "v.pt")
    with pytest.raises(InteropError, match=rf"ragged .*\(6,\).* 1: '{IDS[4]} \(5,\)'"):
        read_vectors(tmp_path / "v.pt")


def test_id_count_must_match_rows(tmp_path):
    src, ids = npy_input(tmp_path, vectors(), ids=IDS[:-1])
    with pytest.raises(InteropError, match="8 ids for 9 vectors"):
        read_vectors(src, ids)


def test_bad_shapes_dtypes_and_kinds_are_refused(tmp_path):
    for name, array, pattern in [("flat", np.zeros(9, np.float32), r"shape \(9,\)"),
                                 ("ints", np.zeros((9, 4), np.int64), "floating point")]:
        src, ids = npy_input(tmp_path, array, name=name)
        with pytest.raises(InteropError, match=pattern):
            read_vectors(src, ids)
    (tmp_path / "v.csv").write_text("1,2\n")
    with pytest.raises(InteropError, match="unknown kind .csv"):
        read_vectors(tmp_path / "v.csv")


def test_mixed_voxceleb_and_flat_ids_are_refused(tmp_path):
    ids = IDS[:-1] + ["loose"]
    src, ids_file = npy_input(tmp_path, vectors(), ids=ids)
    with pytest.raises(InteropError, match=r"VoxCeleb layout .* 1: 'loose'.*--utt2spk"):
        import_vectors(src, tmp_path / "c", ids_file=ids_file)


def test_float16_overflow_is_refused_with_its_ids(tmp_path):
    x = vectors()
    x[3, 1] = 1e6
    src, ids = npy_input(tmp_path, x)
    with pytest.raises(InteropError, match=rf"float16 range .*'{IDS[3]}'.*--dtype float32"):
        import_vectors(src, tmp_path / "c", ids_file=ids, dtype="float16")
    c = imported(tmp_path, src, ids_file=ids, dtype="float32")
    assert c.read("pooled", view=0)[3, 1] == 1e6


def test_existing_outputs_need_overwrite_and_non_caches_are_kept(tmp_path):
    src, ids = npy_input(tmp_path, vectors())
    import_vectors(src, tmp_path / "c", ids_file=ids)
    with pytest.raises(InteropError, match="--overwrite"):
        import_vectors(src, tmp_path / "c", ids_file=ids)
    x2 = vectors(seed=1)
    src2, _ = npy_input(tmp_path, x2, name="other")
    import_vectors(src2, tmp_path / "c", ids_file=ids, overwrite=True, dtype="float32")
    assert np.array_equal(cache_mod.open(tmp_path / "c").read("pooled", view=0), x2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(InteropError, match="not an mrlcache cache"):
        import_vectors(src, tmp_path / "mine", ids_file=ids, overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


# ---------------------------------------------------------------------------- export


def test_kaldi_output_reads_back_with_kaldiio(tmp_path):
    x = vectors()
    written = write_vectors(IDS, x, "kaldi", tmp_path / "out" / "xvector", speakers=SPEAKERS)
    assert [p.name for p in written] == ["xvector.ark", "xvector.utt2spk", "xvector.scp"]
    table = kaldiio.load_scp(str(tmp_path / "out" / "xvector.scp"))
    assert list(table) == IDS
    for u, v in zip(IDS, x):
        assert table[u].shape == (6,) and table[u].dtype == np.float32 and np.array_equal(table[u], v)
    streamed = dict(kaldiio.load_ark(str(tmp_path / "out" / "xvector.ark")))
    assert all(np.array_equal(streamed[u], v) for u, v in zip(IDS, x))
    lines = (tmp_path / "out" / "xvector.utt2spk").read_text().splitlines()
    assert lines[0] == f"{IDS[0]} {SPEAKERS[0]}"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    with pytest.raises(InteropError, match="whitespace"):
        write_vectors(["a b"], x[:1], "kaldi", tmp_path / "spaced")


def test_npz_and_npy_outputs_read_back(tmp_path):
    x = vectors()
    write_vectors(IDS, x, "npz", tmp_path / "v.npz", speakers=SPEAKERS)
    with np.load(tmp_path / "v.npz") as z:
        assert z["ids"].tolist() == IDS and z["speakers"].tolist() == SPEAKERS
        assert np.array_equal(z["vectors"], x)
    write_vectors(IDS, x, "npy", tmp_path / "v.npy")
    assert np.array_equal(np.load(tmp_path / "v.npy"), x)
    assert (tmp_path / "v.ids.txt").read_text().splitlines() == IDS
    write_vectors(IDS, x, "npy", tmp_path / "folder")
    assert np.array_equal(np.load(tmp_path / "folder" / f"{IDS[4]}.npy"), x[4])
    with pytest.raises(InteropError, match="already exist"):
        write_vectors(IDS, x, "npz", tmp_path / "v.npz")
    with pytest.raises(InteropError, match="not relative file paths"):
        write_vectors(["../escape"], x[:1], "npy", tmp_path / "f2")


def test_speakers_with_spaces_go_to_npz_and_are_named_where_utt2spk_cannot_hold_them(tmp_path):
    # scan_tree takes a speaker folder 'spk A' as it is; only utt2spk cannot hold it.
    x, speakers = vectors(), [f"spk {s}" for s in SPEAKERS]
    write_vectors(IDS, x, "npz", tmp_path / "v.npz", speakers=speakers)
    with np.load(tmp_path / "v.npz") as z:
        assert z["speakers"].tolist() == speakers
    for fmt, out in (("npy", "v.npy"), ("npy", "folder"), ("kaldi", "xv")):
        with pytest.raises(InteropError, match=r"speakers with whitespace cannot be written to utt2spk 3: "
                                               r"'spk id00000', 'spk id00001', 'spk id00002'; use --format npz"):
            write_vectors(IDS, x, fmt, tmp_path / out, speakers=speakers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npz"]


def _head_model(tmp_path, pooled_dim=6, dims=(2, 4)):
    from mrlcache.models.matryoshka import MatryoshkaHead
    from mrlcache.models.model import load_model, save_model

    torch.manual_seed(0)
    head = MatryoshkaHead(pooled_dim, list(dims))
    save_model(tmp_path / "model.pt", head)
    return head.eval(), load_model(tmp_path / "model.pt")


def test_export_projects_through_the_head_for_one_view(tmp_path):
    x = vectors(views=2)
    src, ids = npy_input(tmp_path, x)
    c = imported(tmp_path, src, ids_file=ids, layout="views")
    head, model = _head_model(tmp_path)
    got_ids, got, speakers = export_vectors(c, model=model, dim=4, view=1)
    with torch.no_grad():
        want = head(torch.from_numpy(x[:, 1]))[:, :4].numpy()
    assert got_ids == IDS and speakers == SPEAKERS
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(InteropError, match="dims \\[2, 4\\]"):
        export_vectors(c, model=model, dim=3)
    with pytest.raises(InteropError, match="--view 2: the cache holds 2 views"):
        export_vectors(c, view=2)
    with pytest.raises(InteropError, match="give --model"):
        export_vectors(c, dim=4)


def test_hdf5_backend_holds_the_same_vectors(tmp_path):
    x = vectors(views=2)
    src, ids = npy_input(tmp_path, x)
    c = imported(tmp_path, src, ids_file=ids, layout="views", backend="hdf5", shard_size=5)
    assert c.meta["format"] == "hdf5" and np.array_equal(c.read("pooled"), x)
