"""eer's baselines on a training cache too small for them (issue 19 item 3).

An LDA of C speakers has C - 1 discriminant directions; the rest come in the solver's order,
so an lda row at a larger dim is not what its name says: eer says so in a note line.
"""

from __future__ import annotations

from test_eer_cli import eer_json, setup  # noqa: F401 - the shared tiny model, cache and trials


def test_lda_dims_past_the_speakers_are_named(setup):  # noqa: F811
    root, utts = setup
    speakers = len({u.speaker for u in utts})
    report, out = eer_json(root, "--cache", root / "cache", "--baseline", "lda", "--pca-cache", root / "cache",
                           name="lda-note.json")
    assert {r["dim"] for r in report["results"] if r["system"] == "lda"} == {4, 8}
    note = [line for line in out.splitlines() if line.startswith("note: --baseline lda")]
    assert len(note) == 1, out
    assert f"has {speakers} speakers, so only {speakers - 1} LDA directions are discriminant" in note[0]
    assert "at dims [4, 8]" in note[0]
