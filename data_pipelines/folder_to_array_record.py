"""Convert an image folder + a caption table (CSV, TSV or parquet) to clip_jax ArrayRecord shards.

    python data_pipelines/folder_to_array_record.py --table=captions.csv --image_dir=images \
        --out_dir=shards --prefix=train --image_column=file --caption_column=caption

The table names each image (a path relative to ``--image_dir``) and its
caption, optionally an integer label. Only regular files inside ``--image_dir`` of at
most ``--max_image_bytes`` are read: a row naming ``../x``, an absolute path, a symlink
out of the folder (``outside_root``, unless ``--allow_outside_image_dir``), a FIFO or
device (``not_regular_file``) or a larger file (``too_large``) is skipped and counted,
and the stats name the first few of each. Parquet needs pyarrow. Rerunning skips
finished shards; the summary goes to ``OUT_DIR/PREFIX-stats.json``.
"""

import os

from absl import flags

from clip_jax import cli, outputs
from clip_jax.data import bounded, convert, convert_flags, convert_readers

_TABLE = flags.DEFINE_string("table", None, ".csv, .tsv or .parquet file.", required=True)
_IMAGE_DIR = flags.DEFINE_string("image_dir", ".", "Directory the image column is relative to.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the ArrayRecord shards go.", required=True)
_PREFIX = flags.DEFINE_string("prefix", "train", "Output file name prefix.")
_IMAGE_COL = flags.DEFINE_string("image_column", "file", "Column with the image path.")
_CAPTION_COL = flags.DEFINE_list("caption_column", ["caption"], "Column(s) with captions (all kept).")
_MERGE = flags.DEFINE_bool("merge_rows", False, "Rows naming the same image: one record, all captions.")
_LABEL_COL = flags.DEFINE_string("label_column", None, "Optional column with an integer label.")
_ROWS = flags.DEFINE_integer("rows_per_shard", 10_000, "Rows per output shard.")
_SIZE = flags.DEFINE_integer("size", 256, "Short side of the stored images (never enlarged).")
_PROCESSES = flags.DEFINE_integer("num_processes", 4, "Parallel worker processes (one shard each).")
_MAX_BYTES = flags.DEFINE_integer(
    "max_image_bytes", bounded.MAX_MEMBER_BYTES, "An image file larger than this is skipped (too_large)."
)
_OUTSIDE = flags.DEFINE_bool(
    "allow_outside_image_dir",
    False,
    "Read table paths that leave --image_dir (../, absolute, symlinks out); by default they are "
    "skipped and counted as outside_root.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Rewrite existing shards (kept on a rerun only when made from the same input)."
)

_OPTIONS = convert_flags.define()  # filters, --dedup (within each shard), --exclude


def main(argv):
    del argv
    # The shards may go in a subfolder of --image_dir (the default "."), not where the table or
    # the images are: --out_dir may neither be, nor hold, --image_dir.
    outputs.check_target(_OUT_DIR.value, [_TABLE.value], overwrite=True, flag="--out_dir")
    out, images = os.path.realpath(_OUT_DIR.value), os.path.realpath(_IMAGE_DIR.value)
    if out == images or images.startswith(out.rstrip(os.sep) + os.sep):
        raise cli.UserError(f"--out_dir={_OUT_DIR.value} holds the images of --image_dir; choose another")
    tasks = convert_readers.folder_tasks(
        _TABLE.value,
        _IMAGE_DIR.value,
        _OUT_DIR.value,
        _PREFIX.value,
        rows_per_shard=_ROWS.value,
        image_column=_IMAGE_COL.value,
        caption_column=_CAPTION_COL.value,
        label_column=_LABEL_COL.value,
        max_bytes=_MAX_BYTES.value,
        allow_outside_root=_OUTSIDE.value,
        merge_rows=_MERGE.value,
    )
    opts = _OPTIONS(size=_SIZE.value)
    stats = convert.run(
        tasks, opts, _PROCESSES.value, f"{_OUT_DIR.value}/{_PREFIX.value}-stats.json", _OVERWRITE.value
    )
    print(convert.summary_line(stats))


if __name__ == "__main__":
    cli.run(main)
