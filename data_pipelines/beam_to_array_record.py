"""Convert image-text data to clip_jax ArrayRecord shards on Apache Beam (pip install '.[beam]').

One of three inputs, the same as the local converters take:

* ``--input``: webdataset tar shards (one unit of work per tar), as webdataset_to_array_record.py;
* ``--table`` + ``--image_dir``: an image folder and a CSV/TSV/parquet caption table (units of
  ``--rows_per_shard`` rows), as folder_to_array_record.py;
* ``--tfds_name``: a TFDS split prepared in array_record format (units of ``--per_shard``
  examples, by index ranges), as tfds_to_array_record.py.

Locally (DirectRunner; Beam's own flags go after ``--``)::

    python data_pipelines/beam_to_array_record.py --input='laion/{00000..00099}.tar' \
        --out_dir=shards --prefix=train --dedup --exclude=eval.hashes -- \
        --direct_num_workers=8 --direct_running_mode=multi_processing

On Dataflow: the inputs (tars, ``--image_dir``, ``--tfds_data_dir``) and ``--out_dir`` on gs://,
then ``-- --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
--extra_package=dist/clip_jax_tpu-0.1.0.tar.gz`` (README, Data). The table is read here, on
the launching machine. The same records as the local converters; duplicates dropped across
all inputs; the summary goes to ``OUT_DIR/PREFIX-stats.json``.
"""

from absl import flags

from clip_jax import cli
from clip_jax.data import beam_convert, bounded, convert, convert_flags, convert_readers, records

_INPUT = flags.DEFINE_string("input", None, "Glob(s) of .tar shards, comma-separated.")
_TABLE = flags.DEFINE_string("table", None, "A .csv, .tsv or .parquet caption table (with --image_dir).")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "The folder the table's image column is relative to.")
_IMAGE_COL = flags.DEFINE_string("image_column", "file", "Table column with the image path.")
_CAPTION_COL = flags.DEFINE_list("caption_column", ["caption"], "Table column(s) with captions (all kept).")
_MERGE = flags.DEFINE_bool("merge_rows", False, "Rows naming the same image: one record, all captions.")
_LABEL_COL = flags.DEFINE_string("label_column", None, "Optional table column with an integer label.")
_ROWS = flags.DEFINE_integer("rows_per_shard", 10_000, "Table rows per unit of work (and output shard).")
_OUTSIDE = flags.DEFINE_bool(
    "allow_outside_image_dir", False, "Read table paths that leave --image_dir (default: outside_root)."
)
_TFDS_NAME = flags.DEFINE_string("tfds_name", None, "A TFDS dataset prepared in array_record format.")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "Its split.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Its TFDS data directory.")
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "TFDS feature holding the image.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", None, "TFDS feature holding the caption (else the label).")
_LABEL_KEY = flags.DEFINE_string("label_key", "label", "TFDS feature holding the class label.")
_TEMPLATE = flags.DEFINE_string("template", "a photo of a {}.", "Caption made from a TFDS class name.")
_PER_SHARD = flags.DEFINE_integer("per_shard", 10_000, "TFDS examples per unit of work (and output shard).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the shards go (local or gs://).", required=True)
_PREFIX = flags.DEFINE_string("prefix", "train", "Output file name prefix.")
_SHARDS = flags.DEFINE_integer("num_shards", 0, "Output shards (0: as many as units of work).")
_SIZE = flags.DEFINE_integer("size", 256, "Short side of the stored images (never enlarged).")
_QUALITY = flags.DEFINE_integer("quality", 95, "JPEG quality.")
_MAX_BYTES = flags.DEFINE_integer(
    "max_member_bytes", bounded.MAX_MEMBER_BYTES, "A tar member or image file larger than this is skipped."
)
_OPTIONS = convert_flags.define()


def sources() -> list:
    """The units of work of the one input given (tar paths or `convert` readers)."""
    given = [f for f, v in (("--input", _INPUT), ("--table", _TABLE), ("--tfds_name", _TFDS_NAME)) if v.value]
    if len(given) != 1:
        raise cli.UserError(f"give exactly one of --input, --table, --tfds_name (got {given or 'none'})")
    if _INPUT.value:
        return records.expand(_INPUT.value, "--input")
    if _TABLE.value:
        if not _IMAGE_DIR.value:
            raise cli.UserError("--table needs --image_dir (the folder its image column is relative to)")
        if _ROWS.value < 1:
            raise cli.UserError(f"--rows_per_shard={_ROWS.value}: must be >= 1")
        return convert_readers.folder_readers(
            _TABLE.value,
            _IMAGE_DIR.value,
            rows_per_shard=_ROWS.value,
            image_column=_IMAGE_COL.value,
            caption_column=_CAPTION_COL.value,
            label_column=_LABEL_COL.value,
            merge_rows=_MERGE.value,
            max_bytes=_MAX_BYTES.value,
            allow_outside_root=_OUTSIDE.value,
        )
    if _PER_SHARD.value < 1:
        raise cli.UserError(f"--per_shard={_PER_SHARD.value}: must be >= 1")
    return convert_readers.tfds_readers(
        _TFDS_NAME.value,
        _TFDS_SPLIT.value,
        _TFDS_DATA_DIR.value,
        _PER_SHARD.value,
        image_key=_IMAGE_KEY.value,
        caption_key=_CAPTION_KEY.value,
        label_key=_LABEL_KEY.value or None,
        template=_TEMPLATE.value,
    )


def main(argv):
    beam_args = argv[1:]  # what follows "--": the runner's flags
    if _SHARDS.value < 0:
        raise cli.UserError(f"--num_shards={_SHARDS.value}: must be >= 0")
    opts = _OPTIONS(size=_SIZE.value, quality=_QUALITY.value)
    reader = {"max_bytes": _MAX_BYTES.value}
    stats = beam_convert.run(sources(), _OUT_DIR.value, _PREFIX.value, opts, _SHARDS.value, reader, beam_args)
    print(convert.summary_line(stats))


if __name__ == "__main__":
    cli.run(main)
