"""The streaming tar source: exactly once per epoch across processes and workers, resumable."""

import io
import tarfile

import pytest
from PIL import Image

from clip_jax.data import webdataset


def write_tar(path, keys, cut_last=False):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="PNG")
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("png", buf.getvalue()), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if cut_last:
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])  # inside its data


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("tars")
    paths = []
    for s in range(5):  # uneven shard sizes
        write_tar(d / f"{s}.tar", [f"s{s}-{i:03d}" for i in range(7 + 3 * s)])
        paths.append(str(d / f"{s}.tar"))
    return paths


def keys_of(ds):
    return [sample["key"] for sample in ds]


def test_one_epoch_reads_every_sample_once_across_processes_and_workers(shards):
    everything = sorted(k for p in shards for k in keys_of(webdataset.iter_tar_file(p)))
    assert len(everything) == sum(7 + 3 * s for s in range(5))
    seen = []
    for index in range(2):  # two simulated JAX processes
        ds = webdataset.TarShards(shards, 1, 4, num_epochs=1, process_index=index, process_count=2)
        for worker in range(2):  # two Grain workers each, as mp_prefetch slices them
            copy = webdataset.TarShards(shards, 1, 4, 1, index, 2)
            copy.set_slice(slice(worker, None, 2))
            seen += keys_of(copy)
        assert len(keys_of(ds)) == sum(7 + 3 * s for s in range(index, 5, 2))
    assert sorted(seen) == everything


def test_epochs_reshuffle_and_state_resumes_exactly(shards):
    ds = webdataset.TarShards(shards, seed=3, shuffle_buffer=6, process_index=0, process_count=1)
    it = iter(ds)
    epoch_len = sum(7 + 3 * s for s in range(5))
    first = [next(it)["key"] for _ in range(epoch_len)]
    second = [next(it)["key"] for _ in range(5)]
    assert second != first[:5]
    it = iter(ds)
    for _ in range(epoch_len + 2):
        next(it)
    state = it.get_state()
    assert state == {"epoch": 1, "emitted": 2}
    rest = [next(it)["key"] for _ in range(10)]
    again = iter(ds)
    again.set_state(state)
    assert [next(again)["key"] for _ in range(10)] == rest


def test_a_cut_shard_yields_its_samples_then_marks_the_last_truncated(tmp_path):
    write_tar(tmp_path / "cut.tar", ["a", "b", "c"], cut_last=True)
    samples = list(webdataset.iter_tar_file(str(tmp_path / "cut.tar")))
    assert [s["key"] for s in samples] == ["a", "b", "c"]
    assert [s["bad"] for s in samples] == [None, None, "truncated"]
    assert samples[0]["caption"] == b"caption a" and samples[0]["image_ext"] == "png"


def test_too_few_shards_for_the_processes_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="5 tar shards cannot feed 8 processes"):
        webdataset.TarShards(shards, 0, process_index=0, process_count=8)
