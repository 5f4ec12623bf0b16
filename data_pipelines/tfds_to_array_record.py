"""Convert a TFDS dataset (read with ``tfds.data_source``) to clip_jax ArrayRecord shards.

    python data_pipelines/tfds_to_array_record.py --name=coco_captions --split=train \
        --caption_key=captions/text --out_dir=shards --prefix=coco-train
    python data_pipelines/tfds_to_array_record.py --name=imagenette --split=validation \
        --label_key=label --template='a photo of a {}.' --out_dir=shards --prefix=imagenette-val

Image + caption (``--caption_key``), or image + label (the caption is
``--template`` filled with the class name). The dataset must be prepared in
``--data_dir`` (array_record format). The summary goes to ``OUT_DIR/PREFIX-stats.json``.
"""

from absl import flags

from clip_jax import cli
from clip_jax.data import convert, convert_flags, convert_readers

_NAME = flags.DEFINE_string("name", None, "TFDS dataset name.", required=True)
_SPLIT = flags.DEFINE_string("split", "train", "Split.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the ArrayRecord shards go.", required=True)
_PREFIX = flags.DEFINE_string("prefix", "train", "Output file name prefix.")
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "Feature holding the image.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", None, "Feature holding the caption (else from the label).")
_LABEL_KEY = flags.DEFINE_string("label_key", "label", "Feature holding the class label.")
_TEMPLATE = flags.DEFINE_string("template", "a photo of a {}.", "Caption made from a class name.")
_PER_SHARD = flags.DEFINE_integer("per_shard", 10_000, "Examples per output shard.")
_SIZE = flags.DEFINE_integer("size", 256, "Short side of the stored images (never enlarged).")
_PROCESSES = flags.DEFINE_integer("num_processes", 4, "Parallel worker processes (one shard each).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Rewrite existing shards (kept on a rerun only when made from the same input)."
)

_OPTIONS = convert_flags.define()  # filters, --dedup (within each shard), --exclude


def main(argv):
    del argv
    tasks = convert_readers.tfds_tasks(
        _NAME.value,
        _SPLIT.value,
        _OUT_DIR.value,
        _PREFIX.value,
        data_dir=_DATA_DIR.value,
        per_shard=_PER_SHARD.value,
        image_key=_IMAGE_KEY.value,
        caption_key=_CAPTION_KEY.value,
        label_key=_LABEL_KEY.value or None,
        template=_TEMPLATE.value,
    )
    opts = _OPTIONS(size=_SIZE.value)
    stats = convert.run(
        tasks, opts, _PROCESSES.value, f"{_OUT_DIR.value}/{_PREFIX.value}-stats.json", _OVERWRITE.value
    )
    print(convert.summary_line(stats))


if __name__ == "__main__":
    cli.run(main)
