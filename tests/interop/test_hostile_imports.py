"""Hostile vector files: lying .npy headers, odd tensors, all-zero vectors, FIFOs as inputs.

Each is one line naming the file (no traceback, no allocation of what a header claims,
no wait on a FIFO).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mrlcache.interop import InteropError, read_vectors

IDS = ["a", "b", "c"]


def _npy(tmp_path, array, name="x"):
    np.save(tmp_path / f"{name}.npy", array)
    (tmp_path / f"{name}.ids.txt").write_text("\n".join(IDS) + "\n")
    return tmp_path / f"{name}.npy"


@pytest.mark.parametrize("claimed", [b"(9, 4)", b"(999999999, 4)", b"(3, 2)"])
def test_npy_header_that_lies_about_its_size(tmp_path, claimed):
    path = _npy(tmp_path, np.ones((3, 4), np.float32))
    path.write_bytes(path.read_bytes().replace(b"(3, 4)", claimed))
    with pytest.raises(InteropError, match=r"x\.npy: not a plain numpy array \(its header claims shape .* bytes follow"):
        read_vectors(path)


@pytest.mark.parametrize("tensor, kind", [
    (lambda: torch.eye(3, 4).to_sparse(), "sparse"),
    (lambda: torch.empty(3, 4, device="meta"), "meta"),
    (lambda: torch.quantize_per_tensor(torch.ones(3, 4), 0.1, 0, torch.quint8), "quantized"),
])
def test_pt_with_sparse_meta_or_quantized_tensors(tmp_path, tensor, kind):
    torch.save({"ids": IDS, "vectors": tensor()}, tmp_path / "v.pt")
    with pytest.raises(InteropError, match=rf"v\.pt: holds a {kind}.* tensor; save plain dense float tensors"):
        read_vectors(tmp_path / "v.pt")
    torch.save({u: tensor()[0] for u in IDS}, tmp_path / "d.pt")
    with pytest.raises(InteropError, match=rf"d\.pt: holds a {kind}"):
        read_vectors(tmp_path / "d.pt")


def test_all_zero_vectors_are_refused_at_import(tmp_path):
    x = np.ones((3, 4), np.float32)
    x[1] = 0.0
    with pytest.raises(InteropError, match=r"all-zero vectors .* of ids 1: 'b'"):
        read_vectors(_npy(tmp_path, x))


def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "mrlcache", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_fifos_as_vectors_ids_or_trials_are_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    ids_fifo = tmp_path / "ids.fifo"
    os.mkfifo(ids_fifo)
    real = _npy(tmp_path, np.ones((3, 4), np.float32))
    (tmp_path / "model.pt").write_bytes(b"not read: the trials are read first")
    cases = [
        (["import-vectors", "--vectors", fifo, "--ids", real.with_name("x.ids.txt"), "--out", tmp_path / "c1"],
         "pipe.npy: is a FIFO, not a regular file"),
        (["import-vectors", "--vectors", real, "--ids", ids_fifo, "--out", tmp_path / "c2"],
         "ids.fifo: is a FIFO, not a regular file"),
        (["eer", "--model", tmp_path / "model.pt", "--trials", ids_fifo, "--cache", tmp_path],
         "ids.fifo: is a FIFO, not a regular file"),
    ]
    for args, message in cases:
        run = _cli(*args)  # a hang fails by the subprocess timeout
        errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert len(errors) == 1 and message in errors[0], run.stderr


def test_folder_import_never_follows_links_out_of_the_folder(tmp_path):
    folder, outside = tmp_path / "emb", tmp_path / "elsewhere"
    (folder / "spk1").mkdir(parents=True)
    (outside / "spk2").mkdir(parents=True)
    np.save(folder / "spk1" / "a.npy", np.ones(4, np.float32))
    np.save(outside / "spk2" / "b.npy", np.full(4, 2, np.float32))
    (folder / "spk2").symlink_to(outside / "spk2")
    with pytest.raises(InteropError, match=r"spk2: a linked folder inside --vectors .*not followed"):
        read_vectors(folder)
    (folder / "spk2").unlink()
    (folder / "spk1" / "b.npy").symlink_to(outside / "spk2" / "b.npy")
    with pytest.raises(InteropError, match=r"b\.npy: a link to .*outside --vectors"):
        read_vectors(folder)
    (folder / "spk1" / "b.npy").unlink()
    np.save(folder / "spk1" / "c.npy", np.full(4, 3, np.float32))
    (folder / "spk1" / "d.npy").symlink_to(folder / "spk1" / "c.npy")  # inside: fine
    ids, array, _ = read_vectors(folder)
    assert ids == ["spk1/a", "spk1/c", "spk1/d"] and array[2, 0] == 3
