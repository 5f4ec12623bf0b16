"""Write the image hashes of an evaluation set, for the converters' ``--exclude`` (decontamination).

    python data_pipelines/eval_hashes.py --input=imagenet_val/,coco-val-*.array_record \
        --output=eval.hashes

``--input``: image folders, ArrayRecord shards or webdataset tars (comma-separated
globs). Two lines per image: ``sha256:HEX`` (its bytes) and ``dhash:HEX`` (its pixels).
An existing ``--output`` is never overwritten.
"""

from absl import flags

from clip_jax import cli, storage
from clip_jax.data import eval_hashes, records

_INPUT = flags.DEFINE_string("input", None, "Image folders / .array_record / .tar globs, comma-separated.")
_OUTPUT = flags.DEFINE_string("output", None, "The hash file to write (must not exist).")


def main(argv):
    del argv
    if not _INPUT.value or not _OUTPUT.value:
        raise cli.UserError("--input and --output are required")
    if storage.exists(_OUTPUT.value):
        raise cli.UserError(f"--output={_OUTPUT.value} exists; choose a new name (nothing is overwritten)")
    paths = records.expand(_INPUT.value, "--input")
    try:
        lines, counts = eval_hashes.collect(paths)
    except ValueError as e:
        raise cli.UserError(f"--input: {e}") from None
    header = f"# eval image hashes: {counts}\n"
    storage.write_text(_OUTPUT.value, header + "".join(line + "\n" for line in lines))
    print(f"{counts['images']} images, {len(lines)} hashes -> {_OUTPUT.value}; {counts}")


if __name__ == "__main__":
    cli.run(main)
