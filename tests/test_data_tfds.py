"""TFDS as a direct source: a tiny dataset prepared here in array_record format (no
TensorFlow, no downloads), read for training and zero-shot evaluation; data-config checks."""

import dataclasses
import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clip_jax import config_defaults, recipe, train, validation, workdir
from clip_jax.data import formats, skips, tfds_source, tokenizer

tfds = pytest.importorskip("tensorflow_datasets")

NAMES = ["red_thing", "green_thing", "blue_thing"]
NUM_TRAIN, NUM_TEST, BAD_INDEX, SIZE = 24, 6, 5, 8


def key_png(i: int) -> bytes:
    """A solid 8 x 8 PNG whose colour encodes ``i`` (red = i, blue = 7)."""
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (i, 0, 7)).save(buf, format="PNG")
    return buf.getvalue()


class ClipJaxTiny(tfds.core.GeneratorBasedBuilder):
    """Image + caption + ClassLabel; train example BAD_INDEX has a PNG cut short."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=NAMES),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(100, NUM_TEST),
        }

    def _generate_examples(self, offset, count):
        for i in range(offset, offset + count):
            # Encoded bytes, not arrays: TFDS encodes numpy images with TensorFlow.
            image = key_png(i)[:30] if i == BAD_INDEX else key_png(i)
            yield str(i), {"image": image, "caption": f"thing number {i}", "label": i % 3}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir, tokenizer path): the dataset prepared with file_format='array_record'."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    ClipJaxTiny(data_dir=data_dir, file_format="array_record").download_and_prepare()
    captions = [f"thing number {i}" for i in range(200)] + [f"a photo of a {n}." for n in NAMES]
    tok = tokenizer.train_sentencepiece(captions, f"{data_dir}/tok.model", 48)
    return data_dir, tok


def tfds_config(data_dir, tok, **overrides):
    config = config_defaults.base_config()
    config.data.update(format="tfds", tfds_name="clip_jax_tiny", tfds_data_dir=data_dir, tokenizer=tok)
    config.data.update(random_crop=False, stall_timeout_s=60.0, **overrides)
    return config


def test_prepared_and_read_without_tensorflow(prepared):
    data_dir, _ = prepared
    spec = tfds_source.TfdsSpec("clip_jax_tiny", "train", data_dir, caption_key="caption")
    ds = tfds_source.records(spec)
    assert len(ds) == NUM_TRAIN
    record = ds[0]
    assert set(record) == {"key", "image", "caption", "label"} and record["image"][:4] == b"\x89PNG"
    files = tfds_source.split_files(spec)
    assert [f.rsplit("/", 1)[1] for f in files] == ["clip_jax_tiny-train.array_record-00000-of-00001"]
    assert pickle.loads(pickle.dumps(ds))[0] == record  # for Grain worker processes
    assert "tensorflow" not in sys.modules


def test_a_fresh_process_reads_the_prepared_directory_without_the_builder_class(prepared):
    """A training run has no builder class: TFDS reads dataset_info.json + features.json."""
    code = (
        "import sys; from clip_jax.data import tfds_source as t; "
        f"ds = t.records(t.TfdsSpec('clip_jax_tiny', 'test', {prepared[0]!r})); "
        "print(len(ds), ds[0]['caption'], 'tensorflow' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == str(NUM_TEST)
    assert "a photo of a" in proc.stdout and proc.stdout.split()[-1] == "False"


def test_training_epoch_from_config_reads_each_record_once_and_counts_the_bad_one(prepared):
    data_dir, tok = prepared
    config = tfds_config(data_dir, tok, caption_key="caption")
    validation.check_config(config)
    spec = recipe.resolve_data(config, str(data_dir))  # the split's files, for the fingerprint
    assert spec.train_files == tfds_source.split_files(tfds_source.TfdsSpec.from_config(config.data))
    counter = skips.SkipCounter(0.5)
    tk = tokenizer.Tokenizer(tok, 12)
    it = formats.from_config(config.data, spec.train_files, tk, SIZE, NUM_TRAIN // 4, counter)
    batches = [next(it) for _ in range(4)]  # one epoch
    keys = [int(img[0, 0, 0]) for b in batches for img in b["image"]]
    assert all(b["image"].shape == (6, SIZE, SIZE, 3) and b["tokens"].shape == (6, 12) for b in batches)
    # The bad record's place is taken by the next good one of the shuffled order.
    assert BAD_INDEX not in keys and len(keys) == NUM_TRAIN
    assert set(keys) == set(range(NUM_TRAIN)) - {BAD_INDEX}  # one good record twice
    assert counter.as_dict() == {"drawn": NUM_TRAIN, "skipped": 1, "skipped/decode_error": 1}
    # Tokens are the record's own caption.
    first = batches[0]
    row = int(first["image"][0, 0, 0, 0])
    np.testing.assert_array_equal(first["tokens"][0], tk([f"thing number {row}"])[0])


def test_captions_from_class_names_and_a_zero_shot_eval_set(prepared):
    data_dir, tok = prepared
    spec = tfds_source.TfdsSpec("clip_jax_tiny", "test", data_dir, caption_template="a photo of a {}.")
    record = tfds_source.records(spec)[0]
    assert record["caption"] == f"a photo of a {NAMES[record['label']].replace('_', ' ')}."
    ev = tfds_source.load_eval_set(spec, tokenizer.Tokenizer(tok, 12), SIZE)
    assert ev["image"].shape == (NUM_TEST, SIZE, SIZE, 3) and ev["tokens"].shape == (NUM_TEST, 12)
    np.testing.assert_array_equal(ev["label"], ev["image"][:, 0, 0, 0] % 3)
    assert ev["class_names"] == NAMES
    assert ev["prompts"] == [
        ["a photo of a red thing."],
        ["a photo of a green thing."],
        ["a photo of a blue thing."],
    ]
    train_set = tfds_source.load_eval_set(
        dataclasses.replace(spec, split="train"), tokenizer.Tokenizer(tok, 12), SIZE
    )
    assert len(train_set["label"]) == NUM_TRAIN - 1  # the bad record left out


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"tfds_name": "no_such_set"},
            r"config.data.tfds_name='no_such_set' .*Dataset no_such_set not found",
        ),
        ({"tfds_split": "validation"}, r"config.data.tfds_name=.* split 'validation'.*Unknown split"),
        ({"image_key": "picture"}, r"config.data.image_key='picture' is not a feature"),
        ({"caption_key": "text"}, r"config.data.caption_key='text' is not a feature"),
        ({"label_key": "caption"}, r"config.data.label_key='caption' is not a ClassLabel"),
    ],
)
def test_tfds_data_that_does_not_fit_is_named(prepared, overrides, match):
    data_dir, tok = prepared
    config = tfds_config(data_dir, tok, **overrides)
    validation.check_config(config)
    with pytest.raises(validation.ConfigError, match=match):
        recipe.resolve_data(config, str(data_dir))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"format": "parquet"}, r"config.data.format='parquet' is unknown"),
        ({"max_skip_fraction": 1.0}, r"config.data.max_skip_fraction=1.0 must be in \[0, 1\)"),
        ({"max_skip_fraction": -0.1}, r"config.data.max_skip_fraction=-0.1 must be in \[0, 1\)"),
        ({"max_member_bytes": 0}, r"config.data.max_member_bytes=0 must be positive"),
        ({"crop_scale": (0.0, 1.0)}, r"config.data.crop_scale=\(0.0, 1.0\) must be \(min, max\)"),
        ({"crop_scale": (0.9, 0.5)}, r"config.data.crop_scale=\(0.9, 0.5\)"),
        ({"crop_scale": (0.5, 1.5)}, r"config.data.crop_scale=\(0.5, 1.5\)"),
        ({"crop_ratio": (1.3, 0.75)}, r"config.data.crop_ratio=\(1.3, 0.75\)"),
        ({"crop_ratio": (0.75,)}, r"config.data.crop_ratio=\(0.75,\)"),
        ({"format": "tfds"}, r"config.data.tfds_name is required with config.data.format='tfds'"),
        (
            {"format": "tfds", "tfds_name": "x", "label_key": None},
            r"config.data.caption_key is required unless config.data.label_key",
        ),
        (
            {"format": "tfds", "tfds_name": "x", "caption_template": "a photo"},
            r"config.data.caption_key is required .*caption_template='a photo'",
        ),
        ({"format": "tfds", "tfds_name": "x", "tokenizer": None}, r"config.data.tokenizer is required"),
    ],
)
def test_bad_data_config_is_named(overrides, match):
    config = config_defaults.base_config()
    config.data.update(train_files="x-*.array_record", tokenizer="t.model")
    config.data.update(**overrides)
    with pytest.raises(validation.ConfigError, match=match):
        validation.check_config(config)


def test_good_data_configs_pass():
    config = config_defaults.base_config()
    config.data.update(train_files="x-*.array_record", tokenizer="t.model")
    validation.check_config(config)  # array_record, the defaults
    config.data.update(format="tfds", tfds_name="imagenet2012", train_files=None)
    validation.check_config(config)  # tfds, captions from class names
    config.data.update(label_key=None, caption_key="caption", max_skip_fraction=0.0)
    validation.check_config(config)


@pytest.mark.slow
def test_train_run_on_a_tfds_split(prepared, tmp_path):
    """train.run end to end with config.data.format='tfds' (tiny model, 3 steps, 8 CPU devices)."""
    data_dir, tok = prepared
    config = tfds_config(data_dir, tok, caption_key="caption")
    config.model.update(variant="tiny", dtype="float32")
    config.train.update(batch_size=8, total_steps=3, log_every=1)
    config.optim.warmup_steps = 1
    config.sharding.mesh = {"data": -1, "fsdp": 1, "model": 1}
    result = train.run(config, str(tmp_path))
    assert result["train"]["step"] == 3 and np.isfinite(result["train"]["loss"])
    assert (tmp_path / "checkpoints").is_dir()
    # The evaluator on the prepared split: zero-shot through the run's checkpoint.
    from clip_jax import evaluate
    from clip_jax.eval import sources

    run = workdir.load(str(tmp_path))
    model, params, tok_ = run.model, run.params, run.tokenizer
    data = sources.tfds("clip_jax_tiny", "test", model.config.vision.image_size, tok_, data_dir)
    assert data["class_names"] == [n.replace("_", " ") for n in NAMES]
    encoder = evaluate.Encoder(model, params, batch_size=4)
    prompts = evaluate.prompt_sets(data["class_names"], ("a photo of a {}.", "a {}."))
    results = evaluate.zero_shot(encoder, tok_, data["image"], data["label"], prompts)
    assert 0.0 <= results["top1"] <= 1.0 and len(data["label"]) == NUM_TEST
    # The classifier is the prompt ensemble: a plain numpy recomputation agrees.
    text = np.stack([encoder.texts(tok_(p)) for p in prompts])  # [C, T, E]
    mean = text.mean(axis=1)
    weights = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    predicted = np.argmax(encoder.images(data["image"]) @ weights.T, axis=1)
    assert results["top1"] == pytest.approx(np.mean(predicted == data["label"]))
    assert "tensorflow" not in sys.modules
