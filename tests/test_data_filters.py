"""Conversion filters, dedup and --exclude in the local converter; the shards the Beam test shares."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import convert, convert_readers, dedup, eval_hashes, filters, pipeline, records

FILTERS = filters.Filters(min_side=16, max_aspect=3.0, min_caption_chars=3, max_caption_chars=200)
NUM_SHARDS = 40


def picture(seed, size=(36, 32)):
    """A distinct picture: 8 rows of 9 blocks, each row a permutation of well-spaced grey levels
    (adjacent blocks differ by >= 28 levels, so re-encoding never flips a dhash bit)."""
    rng = np.random.default_rng(seed)
    levels = np.stack([rng.permutation(9) * 28 + 8 for _ in range(8)]).astype(np.uint8)
    rgb = np.stack([levels, 255 - levels, levels // 2 + 60], -1)
    return Image.fromarray(rgb).resize(size, Image.NEAREST)


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (("png", image), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shards(root):
    """40 tar shards of 3 distinct pictures each, plus planted samples. Returns (paths, originals
    {key: png bytes} of the distinct ones, eval folder, expected drops {key: (reason, beam only)})."""
    originals = {f"s{i:02d}-{j}": encode(picture(i * 10 + j)) for i in range(NUM_SHARDS) for j in range(3)}
    planted = {  # key: (image bytes, caption, reason, dropped only by a global dedup)
        "s01-5": (originals["s01-0"], "same bytes", "duplicate_exact", False),
        "s02-6": (encode(picture(21), "JPEG", quality=85), "re-encoded", "duplicate_near", False),
        "s07-7": (originals["s03-2"], "same bytes, other shard", "duplicate_exact", True),
        "s08-8": (encode(picture(40, (72, 64)), "JPEG", quality=90), "re-encoded 2x", "duplicate_near", True),
        "s09-3": (encode(picture(900, (8, 8))), "a tiny one", "too_small", False),
        "s10-3": (encode(picture(901, (100, 20))), "a long strip", "extreme_aspect", False),
        "s11-3": (encode(picture(902)), "   ", "empty_caption", False),
        "s11-4": (encode(picture(903)), "ab", "caption_too_short", False),
        "s11-5": (encode(picture(904)), "x" * 201, "caption_too_long", False),
    }
    paths = []
    for i in range(NUM_SHARDS):
        samples = [(k, v, f"picture {k}") for k, v in originals.items() if k.startswith(f"s{i:02d}-")]
        samples += [(k, v[0], v[1]) for k, v in planted.items() if k.startswith(f"s{i:02d}-")]
        paths.append(str(root / f"in-{i:05d}.tar"))
        write_tar(paths[-1], samples)
    evals = root / "eval"
    evals.mkdir()
    (evals / "a.png").write_bytes(originals["s12-0"])  # byte-identical to a training image
    (evals / "b.jpg").write_bytes(encode(picture(131), "JPEG", quality=80))  # s13-1 re-encoded
    (evals / "c.png").write_bytes(encode(picture(5000)))  # in no training shard
    drops = {k: (v[2], v[3]) for k, v in planted.items()}
    drops.update({"s12-0": ("eval_excluded", False), "s13-1": ("eval_excluded", False)})
    return paths, originals, str(evals), drops


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tars")
    paths, originals, evals, drops = make_shards(root)
    lines, counts = eval_hashes.collect([evals])
    exclude = root / "eval.hashes"
    exclude.write_text("# a comment\n" + "\n".join(lines) + "\n")
    return paths, originals, str(exclude), drops, counts


def expected(originals, drops, beam):
    dropped = {k for k, (_, global_only) in drops.items() if beam or not global_only}
    keys = (set(originals) | set(drops)) - dropped
    reasons = {}
    for _, (reason, global_only) in drops.items():
        if beam or not global_only:
            reasons[reason] = reasons.get(reason, 0) + 1
    return keys, reasons


def read_shards(out, prefix):
    recs = pipeline.read_all(records.expand(f"{out}/{prefix}-*.array_record", "x"))
    return {r["key"]: r for r in recs}


def pixels(data, mode="RGB"):
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode), np.int16)


def local_convert(shards, out, dedup_=True):
    paths, _, exclude, _, _ = shards
    opts = convert.Options(size=64, filters=FILTERS, dedup=dedup_, exclude=exclude)
    stats = convert.run(
        convert_readers.webdataset_tasks(paths, str(out), "t"), opts, 1, f"{out}/t-stats.json"
    )
    return stats, read_shards(out, "t")


def test_eval_hashes_of_a_folder(shards):
    *_, counts = shards
    assert counts == {"images": 3}


def test_local_converter_filters_dedups_within_shards_and_excludes(shards, tmp_path):
    _, originals, _, drops, _ = shards
    stats, recs = local_convert(shards, tmp_path)
    keys, reasons = expected(originals, drops, beam=False)
    assert set(recs) == keys
    assert stats["skipped"] == reasons
    for key in ("s00-0", "s03-2", "s39-2"):  # stored as the picture: JPEG keeps the luminance close
        assert np.abs(pixels(recs[key]["image"], "L") - pixels(originals[key], "L")).mean() < 6
        assert recs[key]["caption"] == f"picture {key}"


def test_hashes_catch_byte_and_reencoded_copies_but_not_other_pictures():
    a, b = picture(1), picture(2)
    ha = dedup.image_hashes(encode(a), a)
    again = Image.open(io.BytesIO(encode(a.resize((90, 80), Image.NEAREST), "JPEG", quality=70)))
    hb = dedup.image_hashes(encode(again), again)
    assert ha["sha256"] != hb["sha256"] and ha["dhash"] == hb["dhash"]
    assert dedup.image_hashes(encode(b), b)["dhash"] != ha["dhash"]
    seen = dedup.Seen()
    assert dedup.drop_reason(ha, frozenset(), seen) is None
    assert dedup.drop_reason(ha, frozenset(), seen) == "duplicate_exact"
    assert dedup.drop_reason(hb, frozenset(), seen) == "duplicate_near"
    flat = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]  # dhash 0: matched by bytes only
    reasons = [dedup.drop_reason(dedup.image_hashes(encode(f), f), frozenset(), seen) for f in flat]
    assert reasons == [None, None]


def test_filters_and_exclude_file_errors(tmp_path):
    with pytest.raises(ValueError, match="max_aspect"):
        filters.validate(filters.Filters(max_aspect=0.5))
    bad = tmp_path / "bad.hashes"
    bad.write_text("sha256:abc\nmd5:123\n")
    with pytest.raises(ValueError, match="bad.hashes:2"):
        dedup.load_exclude(str(bad))


def test_eval_hashes_skips_fifos_and_links_out_of_the_folder(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "ok.png").write_bytes(encode(picture(7)))
    os.mkfifo(folder / "pipe.png")  # would block a plain read forever
    (tmp_path / "secret.png").write_bytes(encode(picture(8)))
    (folder / "out.png").symlink_to(tmp_path / "secret.png")
    lines, counts = eval_hashes.collect([str(folder)])
    assert counts == {"images": 1, "skipped/not_regular_file": 1, "skipped/outside_root": 1}
    assert len(lines) == 2


def test_eval_hashes_cli_refuses_to_overwrite_its_output(tmp_path):
    out = tmp_path / "eval.hashes"
    out.write_text("keep me\n")
    (tmp_path / "a.png").write_bytes(encode(picture(3)))
    cmd = [sys.executable, "data_pipelines/eval_hashes.py", f"--input={tmp_path}", f"--output={out}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "exists" in result.stderr.strip().splitlines()[-1]
    assert out.read_text() == "keep me\n"


def altered(seed):
    """``picture(seed)`` with its top-right block recoloured to the other side of its left
    neighbour (one dhash bit), enlarged 1.5x (bicubic) and re-encoded as JPEG."""
    rgb = np.asarray(picture(seed)).copy()
    left, right = int(rgb[0, 28, 0]), int(rgb[0, 32, 0])
    level = 8 if right > left else 248
    rgb[0:4, 32:36] = [level, 255 - level, level // 2 + 60]
    return encode(Image.fromarray(rgb).resize((54, 48), Image.BICUBIC), "JPEG", quality=85)


def test_a_slightly_altered_copy_is_caught_within_the_bit_threshold_only():
    original, copy = picture(3), Image.open(io.BytesIO(altered(3)))
    ha, hb = dedup.image_hashes(encode(original), original), dedup.image_hashes(altered(3), copy)
    assert 1 <= dedup.hamming(ha["dhash"], hb["dhash"]) <= 2  # the premise: a bit or two flipped
    other = dedup.image_hashes(encode(picture(4)), picture(4))
    for bits, reason in ((0, None), (2, "duplicate_near"), (3, "duplicate_near")):
        seen = dedup.Seen(bits)
        assert dedup.drop_reason(ha, frozenset(), seen) is None
        assert dedup.drop_reason(other, frozenset(), seen) is None  # another picture: kept at any bits
        assert dedup.drop_reason(hb, frozenset(), seen) == reason, bits
    with pytest.raises(ValueError, match="near_dup_bits=4"):
        dedup.Seen(4)


def test_band_lookup_finds_every_hash_within_the_threshold_and_none_beyond():
    """Against a brute-force Hamming distance over random 64-bit hashes."""
    rng = np.random.default_rng(0)
    kept = [f"{int(v):016x}" for v in rng.integers(0, 2**63, 300, dtype=np.int64)]
    seen = dedup.Seen(3)
    seen.add([f"dhash:{h}" for h in kept])
    for i in range(300):
        base = int(kept[i], 16)
        for flips in (1, 2, 3, 4, 6):
            bits = rng.choice(64, flips, replace=False)
            probe = f"{base ^ sum(1 << int(b) for b in bits):016x}"
            brute = min(dedup.hamming(probe, h) for h in kept) <= 3
            assert seen.near(probe) == brute, (probe, flips)


def test_local_converter_drops_an_altered_copy_at_near_dup_bits(tmp_path):
    path = tmp_path / "in.tar"
    write_tar(path, [("a", encode(picture(3)), "the picture"), ("b", altered(3), "altered copy")])
    out = {}
    for bits in (0, 2):
        opts = convert.Options(size=64, dedup=True, near_dup_bits=bits)
        tasks = convert_readers.webdataset_tasks([str(path)], str(tmp_path / f"out{bits}"), "t")
        out[bits] = convert.run(tasks, opts, 1, str(tmp_path / f"out{bits}" / "s.json"))["skipped"]
    assert out == {0: {}, 2: {"duplicate_near": 1}}


def test_near_dup_bits_needs_dedup_and_at_most_three_bits(tmp_path):
    (tmp_path / "c.csv").write_text("file,caption\na.png,a picture\n")
    for flags_, message in (
        (["--near_dup_bits=2"], "--near_dup_bits=2 needs --dedup"),
        (["--dedup", "--near_dup_bits=5"], "--near_dup_bits=5: must be 0"),
    ):
        cmd = [sys.executable, "data_pipelines/folder_to_array_record.py", f"--table={tmp_path / 'c.csv'}"]
        cmd += [f"--image_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", *flags_]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr
