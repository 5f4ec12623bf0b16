"""The Beam pipeline (DirectRunner, 2 worker processes) against the local converter on the same
40 tar shards: the same records, duplicates dropped across shards, filters and --exclude counted."""

import pytest

beam = pytest.importorskip("apache_beam")  # the optional `beam` extra

import test_data_filters as shared  # noqa: E402

from clip_jax import cli  # noqa: E402
from clip_jax.data import beam_convert, convert  # noqa: E402

shards = shared.shards  # the fixture: the same 40 tar shards as the local converter's tests

WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.fixture(scope="module")
def beam_run(shards, tmp_path_factory):
    paths, _, exclude, _, _ = shards
    out = tmp_path_factory.mktemp("beam")
    opts = convert.Options(size=64, filters=shared.FILTERS, dedup=True, exclude=exclude)
    stats = beam_convert.run(paths, str(out), "t", opts, beam_args=WORKERS)
    return out, stats, shared.read_shards(out, "t")


def test_beam_drops_copies_across_shards_and_counts_every_reason(shards, beam_run):
    _, originals, _, drops, _ = shards
    out, stats, recs = beam_run
    keys, reasons = shared.expected(originals, drops, beam=True)
    assert set(recs) == keys
    assert stats["skipped"] == reasons
    assert stats["kept"] == len(keys) and stats["shards"] == 40
    assert len(list(out.glob("t-*-of-00040.array_record"))) == 40


def test_beam_and_the_local_converter_write_the_same_records(shards, beam_run, tmp_path):
    _, _, recs = beam_run
    _, local = shared.local_convert(shards, tmp_path)
    assert set(recs) <= set(local)
    assert set(local) - set(recs) == {"s07-7", "s08-8"}  # copies in other shards: only a global dedup
    for key, rec in recs.items():
        assert rec["caption"] == local[key]["caption"]
        assert (shared.pixels(rec["image"]) == shared.pixels(local[key]["image"])).all(), key


def test_existing_shards_are_never_overwritten(shards, beam_run):
    paths, *_ = shards
    out, _, _ = beam_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("t-*")}
    with pytest.raises(cli.UserError, match="already has 40 shards"):
        beam_convert.run(paths, str(out), "t", convert.Options(), beam_args=WORKERS)
    assert {p: p.stat().st_mtime_ns for p in out.glob("t-*")} == before
