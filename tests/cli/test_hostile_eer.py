"""Hostile trial lists for eer: ids leaving the audio root, self trials, nothing left to score."""

from __future__ import annotations

import pytest
from test_eer_cli import run, setup  # noqa: F401 (setup: the module fixture of a model, audio and cache)


def error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("bad", ["../outside.wav", "/etc/hostname", "id1/../../outside.wav"])
def test_trial_ids_may_not_leave_the_audio_root(setup, tmp_path, bad):  # noqa: F811
    root, utts = setup
    (tmp_path / "trials.txt").write_text(f"1 {utts[0].utt_id} {bad}\n0 {utts[0].utt_id} {utts[2].utt_id}\n")
    line = error_line(run("eer", "--model", root / "model.pt", "--trials", tmp_path / "trials.txt",
                          "--data", root / "data"))
    assert f"trial id {bad!r} leaves it" in line and "relative to --data" in line


def test_self_trials_are_reported_with_their_count(setup, tmp_path):  # noqa: F811
    root, utts = setup
    lines = (root / "trials.txt").read_text().splitlines()
    same = [f"1 {utts[0].utt_id} {utts[0].utt_id}", f"1 {utts[1].utt_id} {utts[1].utt_id}"]
    (tmp_path / "trials.txt").write_text("\n".join(lines + same) + "\n")
    result = run("eer", "--model", root / "model.pt", "--trials", tmp_path / "trials.txt", "--cache", root / "cache")
    assert result.exit_code == 0, result.output
    assert "2 trial(s) compare an utterance with itself" in result.output


def test_every_trial_missing_is_one_line(setup, tmp_path):  # noqa: F811
    root, _ = setup
    (tmp_path / "trials.txt").write_text("1 nope/a.wav nope/b.wav\n0 nope/a.wav nope/c.wav\n")
    line = error_line(run("eer", "--model", root / "model.pt", "--trials", tmp_path / "trials.txt",
                          "--data", root / "data", "--skip-missing"))
    assert "none of the 3 trial utterances is available" in line
