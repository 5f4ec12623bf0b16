"""Train a sentencepiece tokenizer for clip_jax on a caption corpus.

    python data_pipelines/train_tokenizer.py --out=tokenizer.model --vocab_size=32000 \
        --input='captions/*.txt'                       # one caption per line
    python data_pipelines/train_tokenizer.py --out=tokenizer.model \
        --input='shards/train-*.array_record' --max_captions=10000000

The model uses clip_jax's special ids (pad 0, unk 1, bos 2, eos 3); pass its
path as ``--config.data.tokenizer``. Its vocabulary size becomes the text
tower's. The model is written under a temporary name and renamed; ``--out`` may not be
one of the inputs, nor an existing file unless ``--overwrite``.
"""

import collections
import itertools
import time

from absl import flags

from clip_jax import cli, outputs
from clip_jax.data import records, tokenizer

_INPUT = flags.DEFINE_string("input", None, "Glob(s) of .txt files or ArrayRecord shards.", required=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the .model file.", required=True)
_VOCAB = flags.DEFINE_integer(
    "vocab_size", 32_000, "Vocabulary size (a ceiling for small corpora).", lower_bound=5
)
_MAX = flags.DEFINE_integer("max_captions", 5_000_000, "Captions to train on at most.", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out when it exists.")


def captions(files, skipped: collections.Counter):
    """Caption strings of .txt files (one a line) and shards; corrupt records skipped and counted."""
    for path in files:
        if path.endswith(".array_record"):
            for _, record in records.read_shard(path, skipped):
                if isinstance(record.get("caption"), str):
                    yield record["caption"]
                else:
                    skipped["missing_caption"] += 1
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())


def main(argv):
    del argv
    files = records.expand(_INPUT.value, "--input")
    # Decided before training: never over an input, nor over an existing model unasked.
    outputs.check_target(_OUT.value, files, _OVERWRITE.value)
    start = time.perf_counter()
    skipped = collections.Counter()
    corpus = itertools.islice(captions(files, skipped), _MAX.value)
    tokenizer.train_sentencepiece(corpus, _OUT.value, _VOCAB.value)
    tok = tokenizer.Tokenizer(_OUT.value, context_length=77)
    print(
        f"{_OUT.value}: {tok.vocab_size} pieces from {len(files)} files in {time.perf_counter() - start:.1f}s"
        f"; skipped {sum(skipped.values())} records {dict(skipped)}"
    )


if __name__ == "__main__":
    cli.run(main)
