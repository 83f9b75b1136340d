"""The backbone record: round trips, strict dicts, and the one conversion of format-1 caches."""

import pytest

from mrlcache.backbone import BackboneRecord, RecordError
from mrlcache.backbone.record import convert_v1_meta

SHA = "ab" * 32


def test_record_round_trips_through_a_plain_dict():
    for record in (BackboneRecord.published("b2", "ft_lm", "vb2+vox2+cnc", SHA),
                   BackboneRecord.random_init("b0", SHA), BackboneRecord("/x/w.pt", None, None, SHA)):
        d = record.to_dict()
        assert set(d) == {"source", "train_type", "dataset", "sha256"}
        assert all(v is None or isinstance(v, str) for v in d.values())
        assert BackboneRecord.from_dict(d) == record
    assert BackboneRecord.random_init("b0").source == "random-init:b0"
    assert BackboneRecord.random_init("b0").is_random and not BackboneRecord.published("b0").is_random


def test_file_records_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert BackboneRecord.file("w.pt").source == str(tmp_path / "w.pt")


@pytest.mark.parametrize("data, message", [
    ([1], "must be a dict"),
    ({"source": "b2", "weights": "x"}, r"unknown keys \['weights'\]"),
    ({"source": 2}, r"non-string values \['source'\]"),
])
def test_bad_records_are_refused(data, message):
    with pytest.raises(RecordError, match=message):
        BackboneRecord.from_dict(data)


@pytest.mark.parametrize("packed, record", [
    ("b2-vox2-ptn", ("b2", "ptn", "vox2")),
    ("b6-vb2+vox2+cnc-ft_mix", ("b6", "ft_mix", "vb2+vox2+cnc")),
    ("/data/w/b2-vox2-ptn.pt", ("/data/w/b2-vox2-ptn.pt", None, None)),
    ("random-init:b0:seed=3", ("random-init:b0", None, None)),
    ("", (None, None, None)),
    ("b0", ("b0", None, None)),
])
def test_format_1_caches_are_converted(packed, record):
    v1 = {"format_version": 1, "weights_source": packed, "weights_sha256": SHA, "pooled_dim": 8, "seed": 3}
    v2 = convert_v1_meta(v1)
    assert v2 == {"format_version": 1, "pooled_dim": 8, "seed": 3,
                  "backbone": {"source": record[0], "train_type": record[1], "dataset": record[2], "sha256": SHA}}
    assert "weights_source" in v1  # the caller's dict is left alone
    assert BackboneRecord.from_meta(v1) == BackboneRecord(*record, SHA)


def test_new_settings_pass_through_and_no_backbone_is_none():
    meta = {"backbone": {"source": "b2", "train_type": "ptn", "dataset": "vox2", "sha256": SHA}}
    assert convert_v1_meta(meta) is meta
    assert BackboneRecord.from_meta(meta) == BackboneRecord("b2", "ptn", "vox2", SHA)
    assert BackboneRecord.from_meta({"pooled_dim": 8}) is None
    only_sha = BackboneRecord.from_meta({"weights_sha256": SHA})
    assert only_sha == BackboneRecord(None, None, None, SHA)
