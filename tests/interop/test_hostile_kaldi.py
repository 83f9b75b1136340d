"""Hostile Kaldi files: no scp entry runs a command or reads stdin, no ark record unpickles.

Every form issue 19 names (an offset or a range after a piped command, form feed and
vertical tab separators) plus a pickle record, a FIFO, a duplicated key and lying sizes.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys

import kaldiio
import numpy as np
import pytest

from mrlcache.interop import InteropError, read_vectors

IDS = ["a", "b", "c"]


@pytest.fixture
def ark(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    kaldiio.save_ark(str(tmp_path / "xv.ark"), dict(zip(IDS, x)), scp=str(tmp_path / "xv.scp"))
    return tmp_path, x


def _scp_with(tmp_path, second: str):
    lines = (tmp_path / "xv.scp").read_text().splitlines()
    lines[1] = second
    (tmp_path / "evil.scp").write_text("\n".join(lines) + "\n")
    return tmp_path / "evil.scp"


@pytest.mark.parametrize("entry", [
    "b touch {m} |:12", "b touch {m} |[0:1]", "b touch {m} |:12[0:1]", "b | touch {m}:5", "b |touch {m}[0:2]",
    "b\ftouch {m} |", "b\vtouch {m} |", "b\f| touch {m}", "b -", "b -:0", "b \v-",
])
def test_scp_commands_and_stdin_never_run(ark, entry):
    tmp_path, _ = ark
    marker = tmp_path / "pwned"
    scp = _scp_with(tmp_path, entry.format(m=marker))
    with pytest.raises(InteropError, match=r"evil\.scp:2: .*not a file but a command or stdin"):
        read_vectors(scp)
    assert not marker.exists()


def test_form_feed_and_vertical_tab_separate_like_spaces(ark):
    tmp_path, x = ark
    lines = (tmp_path / "xv.scp").read_text().splitlines()
    lines = [lines[0].replace(" ", "\f", 1), lines[1].replace(" ", "\v \t", 1), lines[2] + " \r"]
    (tmp_path / "odd.scp").write_text("\n".join(lines) + "\n")
    ids, array, _ = read_vectors(tmp_path / "odd.scp")
    assert ids == IDS and np.array_equal(array, x)


def test_ranges_select_like_kaldi(ark):
    tmp_path, x = ark
    lines = (tmp_path / "xv.scp").read_text().splitlines()
    (tmp_path / "r.scp").write_text("".join(f"{line}[1:3]\n" for line in lines))
    _, array, _ = read_vectors(tmp_path / "r.scp")
    assert np.array_equal(array, x[:, 1:4])  # Kaldi ranges are inclusive
    (tmp_path / "r.scp").write_text(f"{lines[0]}[2:9]\n")
    with pytest.raises(InteropError, match=r"r\.scp:1 .*outside the record"):
        read_vectors(tmp_path / "r.scp")


def test_scp_entries_must_be_regular_files(ark, tmp_path):
    _, _ = ark
    fifo = tmp_path / "pipe.ark"
    os.mkfifo(fifo)
    scp = _scp_with(tmp_path, f"b {fifo}:0")
    with pytest.raises(InteropError, match=r"evil\.scp:2: .*pipe\.ark.* is not a regular file"):
        read_vectors(scp)  # refused at once: nothing waits for a writer on the FIFO
    scp = _scp_with(tmp_path, f"b {tmp_path / 'gone.ark'}:0")
    with pytest.raises(InteropError, match=r"evil\.scp:2: .*gone\.ark.* does not exist"):
        read_vectors(scp)


def test_duplicated_key_is_refused(ark):
    tmp_path, _ = ark
    lines = (tmp_path / "xv.scp").read_text().splitlines()
    scp = _scp_with(tmp_path, lines[0])
    with pytest.raises(InteropError, match=r"evil\.scp:2: key 'a' given twice \(first on line 1\)"):
        read_vectors(scp)


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_record_in_an_ark_is_refused_unloaded(tmp_path):
    marker = tmp_path / "pwned"
    good = tmp_path / "good.ark"
    kaldiio.save_ark(str(good), {"a": np.ones(4, np.float32)})
    evil = tmp_path / "evil.ark"
    evil.write_bytes(good.read_bytes() + b"b PKL" + pickle.dumps(_Payload(marker)))
    with pytest.raises(InteropError, match=r"evil\.ark: record 'b'.*a Python pickle, which could run code"):
        read_vectors(evil)
    assert not marker.exists()
    # kaldiio itself would run it: the test's file really is dangerous.
    list(kaldiio.load_ark(str(evil)))
    assert marker.exists()


def test_sizes_that_lie_are_refused_before_reading(tmp_path):
    evil = tmp_path / "big.ark"
    evil.write_bytes(b"a \0BFV \x04" + struct.pack("<i", 10**9) + b"\0" * 16)
    with pytest.raises(InteropError, match=r"claims 4000000000 bytes .* 16 are left"):
        read_vectors(evil)
    evil.write_bytes(b"a \0BFM \x04" + struct.pack("<i", -3) + b"\x04" + struct.pack("<i", 2))
    with pytest.raises(InteropError, match=r"claims -?\d+ bytes"):
        read_vectors(evil)
    evil.write_bytes(b"a \0BIV \x04\0\0\0\0")
    with pytest.raises(InteropError, match=r"binary 'IV' record"):
        read_vectors(evil)


def test_text_ark_reads(tmp_path):
    (tmp_path / "t.ark").write_text("a [ 1.5 2 3 ]\nb [ 4.5 5 6 ]\n")
    ids, array, _ = read_vectors(tmp_path / "t.ark")
    assert ids == ["a", "b"] and np.allclose(array, [[1.5, 2, 3], [4.5, 5, 6]])


def test_import_command_prints_one_line(ark):
    tmp_path, _ = ark
    marker = tmp_path / "pwned"
    scp = _scp_with(tmp_path, f"b\vtouch {marker} |:3")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-m", "mrlcache", "import-vectors", "--vectors", str(scp),
                          "--out", str(tmp_path / "c")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "evil.scp:2:" in errors[0] and not marker.exists()
    assert not (tmp_path / "c").exists()
