"""Convert webdataset tar shards to clip_jax ArrayRecord shards on Apache Beam (pip install '.[beam]').

Locally (DirectRunner; Beam's own flags go after ``--``)::

    python data_pipelines/beam_to_array_record.py --input='laion/{00000..00099}.tar' \
        --out_dir=shards --prefix=train --dedup --exclude=eval.hashes -- \
        --direct_num_workers=8 --direct_running_mode=multi_processing

On Dataflow: ``--input`` and ``--out_dir`` on gs://, then ``-- --runner=DataflowRunner
--project=P --region=R --temp_location=gs://B/tmp --extra_package=dist/clip_jax_tpu-0.1.0.tar.gz``
(README, Data). The same records as webdataset_to_array_record.py; duplicates dropped
across all inputs; the summary goes to ``OUT_DIR/PREFIX-stats.json``.
"""

from absl import flags

from clip_jax import cli
from clip_jax.data import beam_convert, bounded, convert, convert_flags, records

_INPUT = flags.DEFINE_string("input", None, "Glob(s) of .tar shards, comma-separated.", required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the shards go (local or gs://).", required=True)
_PREFIX = flags.DEFINE_string("prefix", "train", "Output file name prefix.")
_SHARDS = flags.DEFINE_integer("num_shards", 0, "Output shards (0: as many as input tars).")
_SIZE = flags.DEFINE_integer("size", 256, "Short side of the stored images (never enlarged).")
_QUALITY = flags.DEFINE_integer("quality", 95, "JPEG quality.")
_MAX_BYTES = flags.DEFINE_integer(
    "max_member_bytes", bounded.MAX_MEMBER_BYTES, "A tar member larger than this is skipped (too_large)."
)
_OPTIONS = convert_flags.define()


def main(argv):
    beam_args = argv[1:]  # what follows "--": the runner's flags
    shards = records.expand(_INPUT.value, "--input")
    if _SHARDS.value < 0:
        raise cli.UserError(f"--num_shards={_SHARDS.value}: must be >= 0")
    opts = _OPTIONS(size=_SIZE.value, quality=_QUALITY.value)
    reader = {"max_bytes": _MAX_BYTES.value}
    stats = beam_convert.run(shards, _OUT_DIR.value, _PREFIX.value, opts, _SHARDS.value, reader, beam_args)
    print(convert.summary_line(stats))


if __name__ == "__main__":
    cli.run(main)
