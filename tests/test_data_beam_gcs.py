"""The Beam pipeline reads tars and --exclude from gs:// and writes its shards there (through
clip_jax.storage, against the local GCS server of test_gcs_workdir), the same records as on disk."""

import pytest

pytest.importorskip("apache_beam")  # the optional `beam` extra
import test_data_filters as shared  # noqa: E402
import test_gcs_workdir  # noqa: E402  (skips without the GCS emulator)

from clip_jax import storage  # noqa: E402
from clip_jax.data import beam_convert, convert, pipeline, records  # noqa: E402

gcs = test_gcs_workdir.gcs  # the fixture: a local GCS server, "gs://BUCKET"


def test_beam_writes_shards_to_a_bucket(gcs, tmp_path):
    paths, originals, evals, drops = shared.make_shards(tmp_path)
    lines, _ = shared.eval_hashes.collect([evals])
    urls = []
    for path in paths[:16]:  # the planted copies and filtered samples are in shards 1..13
        urls.append(f"{gcs}/in/{path.rsplit('/', 1)[1]}")
        storage.copy_file(path, urls[-1])
    storage.write_text(f"{gcs}/eval.hashes", "\n".join(lines) + "\n")
    opts = convert.Options(size=64, filters=shared.FILTERS, dedup=True, exclude=f"{gcs}/eval.hashes")
    stats = beam_convert.run(urls, f"{gcs}/out", "t", opts, num_shards=3)  # in one process: the server
    local = tmp_path / "copied"
    local.mkdir()
    for url in storage.glob(f"{gcs}/out/t-*.array_record"):
        (local / url.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(url))
    recs = pipeline.read_all(records.expand(f"{local}/t-*-of-00003.array_record", "x"))
    keys, _ = shared.expected({k: v for k, v in originals.items() if int(k[1:3]) < 16}, drops, beam=True)
    assert sorted(r["key"] for r in recs) == sorted(keys)
    assert stats["kept"] == len(keys) and storage.read_json(f"{gcs}/out/t-stats.json")["kept"] == len(keys)
