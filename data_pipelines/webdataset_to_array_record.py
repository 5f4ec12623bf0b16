"""Convert webdataset tar shards (img2dataset's layout) to clip_jax ArrayRecord shards.

    python data_pipelines/webdataset_to_array_record.py --input='laion/{00000..00099}.tar' \
        --out_dir=shards --prefix=train --size=256 --num_processes=16

One output shard per input tar (``OUT_DIR/PREFIX-i-of-n.array_record``);
images re-encoded as JPEG with the short side reduced to ``--size``; bad
samples skipped and counted by reason. Rerunning skips finished shards. The
summary goes to ``OUT_DIR/PREFIX-stats.json``.
"""

from absl import flags

from clip_jax import cli, outputs
from clip_jax.data import bounded, convert, convert_flags, convert_readers, records

_INPUT = flags.DEFINE_string("input", None, "Glob(s) of .tar shards, comma-separated.", required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the ArrayRecord shards go.", required=True)
_PREFIX = flags.DEFINE_string("prefix", "train", "Output file name prefix.")
_SIZE = flags.DEFINE_integer("size", 256, "Short side of the stored images (never enlarged).")
_QUALITY = flags.DEFINE_integer("quality", 95, "JPEG quality.")
_PROCESSES = flags.DEFINE_integer("num_processes", 4, "Parallel worker processes (one shard each).")
_MAX_BYTES = flags.DEFINE_integer(
    "max_member_bytes", bounded.MAX_MEMBER_BYTES, "A tar member larger than this is skipped (too_large)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Rewrite existing shards (kept on a rerun only when made from the same input)."
)
_OPTIONS = convert_flags.define()  # filters, --dedup (within each shard), --exclude


def main(argv):
    del argv
    shards = records.expand(_INPUT.value, "--input")
    # overwrite=True: a rerun keeps finished shards (convert.run); only writing among the inputs is refused
    outputs.check_target(_OUT_DIR.value, shards, overwrite=True, flag="--out_dir")
    tasks = convert_readers.webdataset_tasks(
        shards, _OUT_DIR.value, _PREFIX.value, max_bytes=_MAX_BYTES.value
    )
    opts = _OPTIONS(size=_SIZE.value, quality=_QUALITY.value)
    stats = convert.run(
        tasks, opts, _PROCESSES.value, f"{_OUT_DIR.value}/{_PREFIX.value}-stats.json", _OVERWRITE.value
    )
    print(convert.summary_line(stats))


if __name__ == "__main__":
    cli.run(main)
