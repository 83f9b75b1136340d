"""Hostile torchrun environments for fit (issue 19 item 3): a rendezvous that cannot happen is
one line naming the variable or the absent ranks, never a torch traceback, and no run files.

(Malformed RANK / WORLD_SIZE / LOCAL_RANK values are tests/cli/test_hostile_env.py's.)
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from click.testing import CliRunner

from mrlcache.cli import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    np.save(root / "v.npy", rng.standard_normal((24, 16)).astype(np.float32))
    ids = [f"s{i % 4}/u{i}.wav" for i in range(24)]
    (root / "ids.txt").write_text("\n".join(ids) + "\n")
    (root / "utt2spk").write_text("\n".join(f"{u} s{i % 4}" for i, u in enumerate(ids)) + "\n")
    result = CliRunner().invoke(main, ["import-vectors", "--vectors", str(root / "v.npy"), "--ids", str(root / "ids.txt"),
                                       "--utt2spk", str(root / "utt2spk"), "--out", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return root / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit(cache, out, env):
    return CliRunner().invoke(main, ["fit", "--cache", str(cache), "--dims", "4,8", "--out", str(out), "--epochs", "1",
                                     "--batch-size", "8", "--quiet", "--dist-timeout", "1"], env=env)


def error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize("env, message", [
    ({**TORCHRUN, "MASTER_PORT": "notaport"}, "MASTER_PORT='notaport' in the environment is not a port (1-65535)"),
    ({**TORCHRUN, "MASTER_PORT": "99999"}, "MASTER_PORT='99999' in the environment is not a port"),
    ({**TORCHRUN, "MASTER_PORT": None}, "MASTER_ADDR is set but MASTER_PORT is not"),
    ({**TORCHRUN, "WORLD_SIZE": "99999999999999999999", "MASTER_PORT": "29500"},
     "WORLD_SIZE=99999999999999999999 in the environment is not a number of processes"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": None}, "RANK=0 WORLD_SIZE=2 are set but MASTER_ADDR is not"),
])
def test_a_malformed_rendezvous_is_one_line(cache, tmp_path, env, message):
    assert message in error_line(fit(cache, tmp_path / "run", env))
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_whose_peers_never_come_is_one_line(cache, tmp_path, rank):
    env = {**TORCHRUN, "RANK": rank, "MASTER_PORT": str(free_port())}
    line = error_line(fit(cache, tmp_path / "run", env))
    assert f"rank {rank} of 2 could not join the process group at 127.0.0.1:" in line
    assert "start every rank with torchrun" in line
    assert not (tmp_path / "run" / "model.pt").exists()
