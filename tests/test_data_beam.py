"""The Beam pipeline (DirectRunner, 2 worker processes) against the local converter on the same
40 tar shards: the same records, duplicates dropped across shards, filters and --exclude counted."""

import subprocess
import sys

import pytest

beam = pytest.importorskip("apache_beam")  # the optional `beam` extra

import test_data_filters as shared  # noqa: E402

from clip_jax import cli  # noqa: E402
from clip_jax.data import beam_convert, convert, convert_readers, pipeline, records  # noqa: E402

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


# Image folder + caption table, and a TFDS split: the local converter's readers on Beam. ------------


def make_folder(root):
    """24 distinct pictures in a folder and a CSV naming them, plus planted rows: a missing file,
    a tiny image, an empty caption, a path out of the folder, and a byte copy and a re-encoded copy
    (each later in the same 6-row chunk as its original, so a per-chunk dedup drops them too)."""
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(24):
        (images / f"p{i:02d}.png").write_bytes(shared.encode(shared.picture(700 + i)))
        rows.append((f"p{i:02d}.png", f"picture {i}"))
    (images / "tiny.png").write_bytes(shared.encode(shared.picture(800, (8, 8))))
    (images / "z-copy.png").write_bytes((images / "p00.png").read_bytes())
    (images / "z-again.jpg").write_bytes(shared.encode(shared.picture(707), "JPEG", quality=85))
    (root / "secret.png").write_bytes(shared.encode(shared.picture(801)))
    planted = [("gone.png", "a missing file"), ("tiny.png", "a tiny one"), ("p03.png", " ")]
    planted += [("../secret.png", "outside"), ("z-copy.png", "same bytes"), ("z-again.jpg", "re-encoded")]
    rows = rows[:4] + planted[4:5] + rows[4:8] + planted[5:] + rows[8:] + planted[:4]
    table = root / "captions.csv"
    table.write_text("file,caption\n" + "".join(f"{f},{c}\n" for f, c in rows))
    return str(table), str(images)


FOLDER_DROPS = {
    "missing_image": 1,
    "too_small": 1,
    "empty_caption": 1,
    "outside_root": 1,
    "duplicate_exact": 1,
    "duplicate_near": 1,
}


def test_beam_and_the_local_converter_agree_on_a_folder_and_table(tmp_path):
    table, images = make_folder(tmp_path)
    opts = convert.Options(size=32, filters=shared.FILTERS, dedup=True)
    local_stats = convert.run(
        convert_readers.folder_tasks(table, images, str(tmp_path / "local"), "f", rows_per_shard=6),
        opts,
        1,
        str(tmp_path / "local" / "f-stats.json"),
    )
    readers = convert_readers.folder_readers(table, images, rows_per_shard=6)
    assert len(readers) == 5  # 30 rows: the work is split by rows
    stats = beam_convert.run(readers, str(tmp_path / "beam"), "f", opts, beam_args=WORKERS)
    local, recs = shared.read_shards(tmp_path / "local", "f"), shared.read_shards(tmp_path / "beam", "f")
    assert set(recs) == set(local) == {f"p{i:02d}" for i in range(24)}
    assert stats["skipped"] == local_stats["skipped"] == FOLDER_DROPS
    assert stats["kept"] == 24 and stats["shards"] == 5
    for key, rec in recs.items():
        assert rec["caption"] == local[key]["caption"] == f"picture {int(key[1:])}"
        assert (shared.pixels(rec["image"]) == shared.pixels(local[key]["image"])).all(), key


TFDS_COUNT = 20


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS split in array_record format (no TensorFlow): 20 pictures with captions, the one
    made 9th tiny, the 13th with an empty caption (TFDS stores them in another order)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class ClipJaxBeamTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(TFDS_COUNT):
                size = (8, 8) if i == 9 else (36, 32)
                image = shared.encode(shared.picture(600 + i, size))
                yield str(i), {"image": image, "caption": " " if i == 13 else f"picture {i}"}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    ClipJaxBeamTiny(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_beam_and_the_local_converter_agree_on_a_tfds_split(tfds_dir, tmp_path):
    kw = dict(caption_key="caption", label_key=None)
    opts = convert.Options(size=32, filters=shared.FILTERS, dedup=True)
    tasks = convert_readers.tfds_tasks(
        "clip_jax_beam_tiny", "train", str(tmp_path / "local"), "t", tfds_dir, 10, **kw
    )
    local_stats = convert.run(tasks, opts, 1, str(tmp_path / "local" / "t-stats.json"))
    readers = convert_readers.tfds_readers("clip_jax_beam_tiny", "train", tfds_dir, 7, **kw)
    assert [(r.start, r.stop) for r in readers] == [(0, 7), (7, 14), (14, 20)]  # split by index ranges
    stats = beam_convert.run(readers, str(tmp_path / "beam"), "t", opts, num_shards=2, beam_args=WORKERS)
    local, recs = shared.read_shards(tmp_path / "local", "t"), shared.read_shards(tmp_path / "beam", "t")
    drops = {"too_small": 1, "empty_caption": 1}
    assert stats["skipped"] == local_stats["skipped"] == drops
    assert set(recs) == set(local) and len(recs) == TFDS_COUNT - 2
    assert {r["caption"] for r in recs.values()} == {
        f"picture {i}" for i in range(TFDS_COUNT) if i not in (9, 13)
    }
    assert stats["shards"] == 2
    for key, rec in recs.items():
        assert rec["caption"] == local[key]["caption"]
        assert (shared.pixels(rec["image"]) == shared.pixels(local[key]["image"])).all(), key


def test_beam_drops_an_altered_copy_across_inputs_at_near_dup_bits(tmp_path):
    """Banded candidate lookup on Beam: the altered copies (other tars) go at 2 bits, not at 0;
    two records that share a key ("c", from two tars) are judged apart."""
    tars = [tmp_path / f"{n}.tar" for n in "xyz"]
    shared.write_tar(tars[0], [("a", shared.encode(shared.picture(3)), "the picture")])
    shared.write_tar(
        tars[1], [("b", shared.altered(3), "altered"), ("c", shared.encode(shared.picture(4)), "x y")]
    )
    shared.write_tar(tars[2], [("c", shared.altered(4), "altered, same key")])
    got = {}
    for bits in (0, 2):
        opts = convert.Options(size=64, dedup=True, near_dup_bits=bits)
        out = tmp_path / f"o{bits}"
        stats = beam_convert.run([str(t) for t in tars], str(out), "t", opts, beam_args=WORKERS)
        recs = pipeline.read_all(records.expand(f"{out}/t-*.array_record", "x"))
        got[bits] = (sorted(r["key"] for r in recs), stats["skipped"])
    assert got == {0: (["a", "b", "c", "c"], {}), 2: (["a", "c"], {"duplicate_near": 2})}


def test_the_command_takes_one_input_of_three(tmp_path):
    table, images = make_folder(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "data_pipelines/beam_to_array_record.py", f"--table={table}", f"--out_dir={out}"]
    both = subprocess.run([*cmd, "--tfds_name=x"], capture_output=True, text=True, timeout=300)
    assert both.returncode == 2
    assert "give exactly one of --input, --table, --tfds_name" in both.stderr.strip().splitlines()[-1]
    ran = subprocess.run(
        [*cmd, f"--image_dir={images}", "--rows_per_shard=10"], capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    # No filters, no dedup: all but the missing, the outside and the empty-caption rows.
    assert "kept 27;" in ran.stdout and "3 shards" in ran.stdout, ran.stdout
    assert len(shared.read_shards(out, "train")) == 27
