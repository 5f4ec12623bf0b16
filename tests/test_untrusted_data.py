"""Data from others: bounded reads (a member claiming gigabytes, /dev/zero, a FIFO), paths kept
inside the image folder, and shards that would give zero samples are errors naming the file."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading

import pytest
from PIL import Image

from clip_jax import inference
from clip_jax.data import bounded, convert, convert_readers, webdataset

CLAIMED = 1_500_000_000  # what the crafted members claim: 1.5 GB
MEMORY_BOUND = 200 * 2**20  # growth of the peak RSS allowed while reading them: far under CLAIMED


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_claiming_tar(path) -> None:
    """A good sample, then a member whose header claims CLAIMED bytes with only 20 KB after it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar, "good.png", png())
        add(tar, "good.txt", b"a red square")
        add(tar, "huge.txt", b"caption")
    data = buf.getvalue()
    info = tarfile.TarInfo("huge.jpg")
    info.size = CLAIMED
    end = data.rindex(b"caption") + 512  # after the last member's data block
    path.write_bytes(data[:end] + info.tobuf(format=tarfile.GNU_FORMAT) + b"\xff" * 20_000)


def write_sparse_tar(path) -> bool:
    """A GNU sparse member of CLAIMED bytes (a few KB on disk), made by GNU tar; False without it."""
    if not shutil.which("tar") or not shutil.which("truncate"):
        return False
    src = path.parent / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    (src / "a.txt").write_bytes(b"a red square")
    subprocess.run(["truncate", "-s", str(CLAIMED), str(src / "b.jpg")], check=True)
    (src / "b.txt").write_bytes(b"zeros")
    names = ["a.png", "a.txt", "b.jpg", "b.txt"]
    cmd = ["tar", "--sparse", "--format=gnu", "-cf", str(path), "-C", str(src), *names]
    return subprocess.run(cmd, capture_output=True).returncode == 0


MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from clip_jax.data import convert, convert_readers, webdataset
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    samples = [(s["key"], s["bad"], s.get("detail")) for s in webdataset.iter_tar_file(sys.argv[1])]
    task = convert_readers.webdataset_tasks([sys.argv[1]], sys.argv[2], "x")[0]
    stats = convert.run_task(task, convert.Options(size=8))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": after - before, "samples": samples, "stats": stats}))
    """
)


def measure(tar_path, out_dir) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", MEASURE, str(tar_path), str(out_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["claiming", "sparse"])
def test_a_member_claiming_gigabytes_is_a_counted_skip_in_bounded_memory(tmp_path, kind):
    path = tmp_path / f"{kind}.tar"
    if kind == "claiming":
        write_claiming_tar(path)
    elif not write_sparse_tar(path):
        pytest.skip("needs GNU tar")
    assert path.stat().st_size < 100_000
    got = measure(path, tmp_path / "out")
    assert got["growth"] < MEMORY_BOUND, got["growth"]
    bad = {key: (reason, detail) for key, reason, detail in got["samples"] if reason}
    ((key, (reason, detail)),) = bad.items()
    assert reason == "too_large" and str(path) in detail and str(CLAIMED) in detail
    assert got["stats"]["kept"] == 1 and got["stats"]["skipped"] == {"too_large": 1}
    assert str(path) in got["stats"]["skipped_examples"]["too_large"][0]


def test_the_member_limit_is_configurable(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a.png", png())
        add(tar, "a.txt", b"a red square")
    samples = list(webdataset.iter_tar_file(str(path), max_member_bytes=len(png()) - 1))
    assert [s["bad"] for s in samples] == ["too_large"] and "a.png" in samples[0]["detail"]
    one = dict(num_epochs=1, process_index=0, process_count=1)
    ds = webdataset.TarShards([str(path)], 0, max_member_bytes=9, **one)
    assert [s["bad"] for s in ds] == ["too_large"]  # the training reader
    task = convert_readers.webdataset_tasks(
        [str(path)], str(tmp_path / "out"), "x", max_bytes=len(png()) - 1
    )[0]
    assert convert.run_task(task, convert.Options(size=8))["skipped"] == {"too_large": 1}


def run_with_guard(fn, timeout_s: float = 60.0):
    """``fn()`` on a daemon thread; fails (instead of hanging the suite) when it does not return."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=fn()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "the reader hung"
    return out["result"]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(png())
    os.mkfifo(root / "pipe.png")
    (tmp_path / "secret.png").write_bytes(png())  # outside the folder
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink("/dev/zero", root / "zero.png")
    rows = [
        ("ok.png", "fine"),
        ("/dev/zero", "absolute"),
        ("pipe.png", "a fifo"),
        ("../secret.png", "dot dot"),
        ("link.png", "a symlink out"),
        ("zero.png", "a symlink to a device"),
        ("missing.png", "missing"),
    ]
    table = tmp_path / "captions.csv"
    table.write_text("file,caption\n" + "".join(f"{f},{c}\n" for f, c in rows))
    return root, table


def test_table_rows_naming_devices_fifos_and_paths_outside_are_counted_skips(image_folder, tmp_path):
    root, table = image_folder
    task = convert_readers.folder_tasks(str(table), str(root), str(tmp_path / "out"), "x")[0]
    stats = run_with_guard(lambda: convert.run_task(task, convert.Options(size=8)))
    assert stats["kept"] == 1
    assert stats["skipped"] == {"outside_root": 4, "not_regular_file": 1, "missing_image": 1}
    examples = " ".join(stats["skipped_examples"]["outside_root"])
    for name in ("/dev/zero", "../secret.png", "link.png", "zero.png"):
        assert name in examples
    assert "pipe.png" in stats["skipped_examples"]["not_regular_file"][0]


def test_paths_outside_the_folder_when_allowed_are_still_bounded(image_folder, tmp_path):
    root, table = image_folder
    task = convert_readers.folder_tasks(
        str(table), str(root), str(tmp_path / "out"), "x", allow_outside_root=True
    )[0]
    stats = run_with_guard(lambda: convert.run_task(task, convert.Options(size=8)))
    assert stats["kept"] == 3  # ok, ../secret.png, link.png
    assert stats["skipped"] == {"not_regular_file": 3, "missing_image": 1}  # /dev/zero twice, the FIFO
    with pytest.raises(bounded.skips.BadRecord, match="too_large"):
        bounded.read_file(str(root / "ok.png"), max_bytes=10)


def test_compressed_and_non_tar_shards_are_errors_naming_the_file(tmp_path):
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        add(tar, "a.png", png())
        add(tar, "a.txt", b"a red square")
    gz = tmp_path / "shard.tar"  # compressed, named as if it were not: found by its magic bytes
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(bounded.BadShard, match=f"{gz}.*gzip"):
        list(webdataset.iter_tar_file(str(gz)))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"<html>not found</html>" * 40)
    with pytest.raises(bounded.BadShard, match=f"{junk}.*not a tar"):
        list(webdataset.iter_tar_file(str(junk)))
    task = convert_readers.webdataset_tasks([str(gz)], str(tmp_path / "out"), "x")[0]
    with pytest.raises(bounded.BadShard, match="gzip"):
        convert.run_task(task, convert.Options(size=8))
    assert not os.path.exists(task.out_path)


@pytest.mark.parametrize("content", ["zero_bytes", "no_members"])
def test_empty_shards_are_errors_naming_the_files(tmp_path, content):
    path = tmp_path / "empty.tar"
    if content == "zero_bytes":
        path.write_bytes(b"")
    else:
        with tarfile.open(path, "w"):
            pass
    task = convert_readers.webdataset_tasks([str(path)], str(tmp_path / "out"), "x")[0]
    with pytest.raises(bounded.BadShard, match=f"{path}.*empty"):
        convert.run_task(task, convert.Options(size=8))
    ds = webdataset.TarShards([str(path)], seed=0, num_epochs=1, process_index=0, process_count=1)
    with pytest.raises(bounded.BadShard, match=f"no samples: {path}"):
        list(ds)


def test_inference_reads_only_bounded_regular_files(image_folder):
    root, _ = image_folder
    for path, reason in (("/dev/zero", "not_regular_file"), (str(root / "pipe.png"), "not_regular_file")):
        read = lambda p=path: pytest.raises(bounded.skips.BadRecord, inference.read_image, p)  # noqa: E731
        result = run_with_guard(read)
        assert result.value.reason == reason and path in str(result.value)
    assert inference.read_image(str(root / "ok.png")).size == (8, 8)


def test_a_shard_that_is_not_a_regular_file_is_an_error(tmp_path):
    os.mkfifo(tmp_path / "fifo.tar")
    for path in (str(tmp_path / "fifo.tar"), "/dev/zero"):
        read = lambda p=path: pytest.raises(bounded.BadShard, list, webdataset.iter_tar_file(p))  # noqa: E731
        result = run_with_guard(read)
        assert "not a regular file" in str(result.value) and path in str(result.value)
