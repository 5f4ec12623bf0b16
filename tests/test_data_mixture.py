"""Weighted mixtures and elastic resume of the Grain training stream (tiny 8 px records).

A record's key is written into its image (a solid colour, centre crop only), so the keys
come back out of the decoded batches; the expectations are computed from the keys alone.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from absl import flags
from conftest import load_config
from test_data_multiprocess import image_key, key_image

from clip_jax import config_defaults, data_fingerprint, train, validation
from clip_jax.data import elastic, mixture, pipeline, records, tokenizer

IMAGE_SIZE = 8


def write_source(tmp_path, name: str, keys, shards: int = 2, **fields) -> tuple[str, ...]:
    recs = [{"key": str(k), "image": key_image(k), "caption": f"photo {k % 7}", **fields} for k in keys]
    return tuple(records.write_shards(recs, str(tmp_path / name), shards))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    tokenizer.train_sentencepiece([f"photo {i} of a thing" for i in range(50)], str(path), 32)
    return tokenizer.Tokenizer(str(path), 8)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    a = mixture.Source("a", write_source(tmp, "a", range(300)), weight=0.8)
    b = mixture.Source("b", write_source(tmp, "b", range(1000, 1200)), weight=0.2)
    return [a, b]


def iterator(sources, tok, local_batch, seed=5, **kw):
    kw.setdefault("crop", None)
    return pipeline.train_iterator(
        sources, tok, IMAGE_SIZE, local_batch, seed=seed, num_threads=1, stall_timeout_s=None, **kw
    )


def keys_of(batch) -> list[int]:
    return [image_key(img) for img in batch["image"]]


def test_a_mixture_draws_by_weight_and_each_source_epoch_sees_every_record_once(mix, tok):
    it = iterator(mix, tok, 64)
    keys = [k for _ in range(50) for k in keys_of(next(it))]
    from_a = [k for k in keys if k < 1000]
    assert abs(len(from_a) / len(keys) - 0.8) <= 0.03
    # The counts the train loop logs (data/NAME_examples) are the examples drawn.
    logged = {"data/a_examples": len(from_a), "data/b_examples": 3200 - len(from_a)}
    assert elastic.source_metrics(it) == logged
    # Each source runs its own epochs: its first 300 (200) draws are its records once each.
    assert sorted(from_a[:300]) == list(range(300))
    assert sorted([k for k in keys if k >= 1000][:200]) == list(range(1000, 1200))
    assert from_a[:300] != from_a[300:600]  # the next epoch is reshuffled
    # The order is drawn from the seed: another seed, other batches, the same shares.
    other = [k for _ in range(50) for k in keys_of(next(iterator(mix, tok, 64, seed=6)))]
    assert other[:64] != keys[:64]


def test_an_interrupted_mixture_resumes_bitwise_equal(mix, tok):
    whole = iterator(mix, tok, 64, crop=pipeline.DEFAULT_CROP)
    expected = [next(whole) for _ in range(50)]
    first = iterator(mix, tok, 64, crop=pipeline.DEFAULT_CROP)
    for _ in range(25):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    first.close()
    resumed = iterator(mix, tok, 64, crop=pipeline.DEFAULT_CROP)
    resumed.set_state(state)
    for want in expected[25:]:
        got = next(resumed)
        for name in ("image", "tokens"):
            np.testing.assert_array_equal(got[name], want[name])


def run_processes(source, tok, count: int, steps: int, state=None) -> tuple[list[list[int]], dict]:
    """``steps`` global batches (16) read by ``count`` simulated processes; (keys per global
    batch, the state every process would save)."""
    its = [
        iterator(source, tok, 16 // count, seed=3, process_index=p, process_count=count) for p in range(count)
    ]
    if state is not None:
        for it in its:
            it.set_state(json.loads(json.dumps(state)))
    batches = [[k for it in its for k in keys_of(next(it))] for _ in range(steps)]
    states = [it.get_state() for it in its]
    assert all(s == states[0] for s in states)
    return batches, states[0]


@pytest.mark.parametrize("resume_on", [1, 4])
def test_resuming_on_another_process_count_sees_the_rest_of_the_epoch_once(tmp_path, tok, resume_on):
    source = write_source(tmp_path, "e", range(410), shards=3)  # an epoch ends inside step 26
    whole, _ = run_processes(source, tok, 2, 26)
    first, state = run_processes(source, tok, 2, 20)
    assert first == whole[:20] and state["global_example"] == 320
    rest, _ = run_processes(source, tok, resume_on, 6, state)
    assert rest == whole[20:]  # the same global batches, in the same order
    epoch = [k for batch in first + rest for k in batch][:410]
    assert sorted(epoch) == list(range(410))  # every record once, none twice


def test_a_mixture_resumes_on_another_process_count(mix, tok):
    whole, _ = run_processes(mix, tok, 2, 12)
    _, state = run_processes(mix, tok, 2, 5)
    rest, _ = run_processes(mix, tok, 4, 7, state)
    assert rest == whole[5:]


def test_a_position_saved_by_other_processes_is_read_and_checked(tmp_path):
    state = {"kind": elastic.KIND, "global_example": 320, "global_batch": 16}
    for p in range(2):
        (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps(state))
    assert elastic.saved_state(str(tmp_path), 0, 2) is None  # its own file: Grain reads it
    assert elastic.saved_state(str(tmp_path), 3, 4) == state
    (tmp_path / "process_1-of-2.json").write_text(json.dumps({"next_index": 20}))
    with pytest.raises(elastic.PositionError, match="allow_data_change"):
        elastic.saved_state(str(tmp_path), 0, 1)


def test_the_schedule_is_exact_per_block_and_a_function_of_the_position():
    schedule = mixture.Schedule.from_weights([0.7, 0.2, 0.1], seed=1)
    located = [schedule.locate(g) for g in range(2 * mixture.BLOCK + 5)]
    for s, count in enumerate(schedule.counts):
        inner = [i for src, i in located if src == s]
        assert inner == list(range(len(inner)))  # each source's stream read in order, no gaps
        assert schedule.counts_before(mixture.BLOCK)[s] == count
    assert schedule.counts == (2867, 819, 410)  # 4096 x weights, largest remainder
    assert schedule.counts_before(len(located)) == np.bincount([s for s, _ in located]).tolist()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"weight": 0.0}, "config.data.sources.b.weight=0.0 must be a number > 0"),
        ({"weight": -1}, "config.data.sources.b.weight=-1 must be a number > 0"),
        ({"weight": "x"}, "config.data.sources.b.weight='x' must be a number > 0"),
        (
            {"files": "/nowhere/*.array_record"},
            "config.data.sources.b.files='/nowhere/*.array_record' matches",
        ),
        ({"format": "webdataset"}, "config.data.sources.b.format='webdataset': a mixture source must be"),
        ({"wieght": 1}, "config.data.sources.b: unknown field(s) ['wieght']"),
        ({"weight": 1e-6}, "config.data.sources.b.weight=1e-06 is below 1/4096 of the total"),
    ],
)
def test_a_bad_source_is_one_line_naming_its_field(mix, source, message):
    config = config_defaults.base_config()
    config.data.tokenizer = "tok.model"
    good = {"files": ",".join(mix[0].files), "weight": 1.0}
    config.data.sources = {"a": good, "b": {**good, **source}}
    with pytest.raises(validation.ConfigError) as error:
        validation.check_data(config.data)
        validation.data_sources(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_sources_resolve_sorted_by_name_and_exclude_train_files(mix):
    config = config_defaults.base_config()
    config.data.sources = {
        "z": {"files": ",".join(mix[1].files), "weight": 1, "caption_field": "recaption"},
        "a": {"files": mix[0].files[0], "weight": 3},
    }
    resolved = validation.data_sources(config)
    assert [(s.name, s.files, s.weight, s.caption_field) for s in resolved] == [
        ("a", mix[0].files[:1], 3.0, None),
        ("z", mix[1].files, 1.0, "recaption"),
    ]
    config.data.train_files = "x"
    with pytest.raises(validation.ConfigError, match="config.data.sources and config.data.train_files"):
        validation.check_data(config.data)


@pytest.mark.slow  # starts Grain worker processes (~15 s on 2 busy cores)
def test_worker_processes_give_the_same_batches_and_resume(mix, tok):
    if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags (cli.run parses them)
        flags.FLAGS.mark_as_parsed()

    def keys(state=None, steps=6, **kw):
        it = iterator(mix, tok, 32, seed=1, **kw)
        if state is not None:
            it.set_state(state)
        out = [keys_of(next(it)) for _ in range(steps)]
        state = it.get_state()
        it.close()
        return out, state

    threads, _ = keys()
    workers, _ = keys(num_workers=2)
    _, state = keys(steps=3, num_workers=2)
    resumed, _ = keys(state, steps=3, num_workers=2)
    assert workers == threads and resumed == threads[3:]


def test_the_fingerprint_names_a_changed_weight_not_a_changed_process_count(mix, monkeypatch):
    data = config_defaults.base_config().data
    fingerprint = lambda sources: data_fingerprint.data_fingerprint(data, [], "tok.model", 64, 8, sources)
    base = fingerprint(mix)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    assert data_fingerprint.data_changes(base, fingerprint(mix)) == []
    heavier = [mix[0], dataclasses.replace(mix[1], weight=0.5)]
    assert [c.split(":")[0] for c in data_fingerprint.data_changes(base, fingerprint(heavier))] == ["sources"]


@pytest.mark.slow  # a short training run of the demo model (compiles the step)
def test_a_run_on_a_mixture_logs_examples_per_source_and_saves_its_position(tmp_path, scenes_dataset):
    config = load_config("demo")
    del config.data["scenes"]
    config.eval.evaluators = {}  # the demo's scenes evaluator needs the scenes
    files = scenes_dataset.train_files  # 4 shards of 128 records
    config.data.tokenizer = scenes_dataset.tokenizer
    config.data.sources = {
        "left": {"files": ",".join(files[:2]), "weight": 3.0},
        "right": {"files": ",".join(files[2:]), "weight": 1.0, "caption_field": "caption"},
    }
    config.train.update(batch_size=32, total_steps=4, log_every=2)
    train.run(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert r["data/left_examples"] + r["data/right_examples"] == 32 * r["step"]
    assert abs(rows[-1]["data/left_examples"] / 128 - 0.75) <= 0.1
    saved = json.loads((tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text())
    assert saved["kind"] == elastic.KIND and saved["global_example"] == 128
    assert saved["sources"]["left"]["examples"] == rows[-1]["data/left_examples"]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS split in array_record format (no TensorFlow): 200 records keyed 1000..1199."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class ClipJaxMixTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for k in range(1000, 1200):
                yield str(k), {"image": key_image(k), "caption": f"photo {k % 7}"}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    ClipJaxMixTiny(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def tfds_mix_config(mix, data_dir, **tfds_fields):
    config = config_defaults.base_config()
    config.data.sources = {
        "laion": {"files": ",".join(mix[0].files), "weight": 0.8},
        "tfds": {"format": "tfds", "tfds_name": "clip_jax_mix_tiny", "tfds_data_dir": data_dir, "weight": 0.2}
        | {"caption_key": "caption", **tfds_fields},
    }
    return config


def test_a_tfds_source_mixes_by_weight_and_resumes_exactly(mix, tfds_dir, tok):
    sources = validation.data_sources(tfds_mix_config(mix, tfds_dir))
    assert [(s.name, s.format) for s in sources] == [("laion", "array_record"), ("tfds", "tfds")]
    assert all(f.endswith(".array_record") or ".array_record-" in f for f in sources[1].files)
    whole = iterator(sources, tok, 64)
    expected = [next(whole) for _ in range(50)]
    keys = [k for b in expected for k in keys_of(b)]
    from_tfds = [k for k in keys if k >= 1000]
    assert abs(len(from_tfds) / len(keys) - 0.2) <= 0.03
    assert sorted(from_tfds[:200]) == list(range(1000, 1200))  # its epoch: every record once
    assert elastic.source_metrics(whole) == {
        "data/laion_examples": len(keys) - len(from_tfds),
        "data/tfds_examples": len(from_tfds),
    }
    first = iterator(sources, tok, 64)
    for _ in range(25):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    first.close()
    resumed = iterator(validation.data_sources(tfds_mix_config(mix, tfds_dir)), tok, 64)
    resumed.set_state(state)
    for want in expected[25:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want), "a resumed batch differs"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tfds_split": "nope"}, "config.data.sources.tfds.tfds_name='clip_jax_mix_tiny' split 'nope'"),
        ({"image_key": "photo"}, "config.data.sources.tfds.image_key='photo' is not a feature"),
        ({"caption_key": None}, "config.data.sources.tfds.label_key='label' is not a ClassLabel feature"),
        ({"caption_key": None, "label_key": None}, "config.data.sources.tfds.caption_key is required unless"),
        ({"files": "x"}, "config.data.sources.tfds: unknown field(s) ['files']"),
    ],
)
def test_a_bad_tfds_source_is_one_line_naming_its_field(mix, tfds_dir, fields, message):
    config = tfds_mix_config(mix, tfds_dir, **fields)
    config.data.tokenizer = "tok.model"
    with pytest.raises(validation.ConfigError) as error:
        validation.check_data(config.data)
        validation.data_sources(config)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow  # a 4-step demo run (~30 s on 2 busy cores)
def test_a_run_on_a_mixture_with_a_tfds_source_logs_it_and_saves_its_position(
    tmp_path, scenes_dataset, tfds_dir
):
    config = load_config("demo")
    del config.data["scenes"]
    config.eval.evaluators = {}  # the demo's scenes evaluator needs the scenes
    config.data.tokenizer = scenes_dataset.tokenizer
    config.data.sources = {
        "scenes": {"files": ",".join(scenes_dataset.train_files), "weight": 3.0},
        "tiny": {"format": "tfds", "tfds_name": "clip_jax_mix_tiny", "tfds_data_dir": tfds_dir}
        | {"caption_key": "caption", "weight": 1.0},
    }
    config.train.update(batch_size=32, total_steps=4, log_every=2)
    train.run(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
    assert rows[-1]["data/scenes_examples"] + rows[-1]["data/tiny_examples"] == 128
    assert abs(rows[-1]["data/tiny_examples"] / 128 - 0.25) <= 0.1
    saved = json.loads((tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text())
    assert saved["global_example"] == 128
    assert saved["sources"]["tiny"]["examples"] == rows[-1]["data/tiny_examples"]
