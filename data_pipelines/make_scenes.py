"""Write the synthetic captioned-scenes dataset (the demo's data) to a directory.

    python data_pipelines/make_scenes.py --out=/tmp/scenes --num_train=20000 --image_size=32

Produces ArrayRecord shards (train, held-out things, held-out scenes) and a
sentencepiece tokenizer trained on the training captions. The training run
does this itself when its config has a ``data.scenes`` section.
"""

import time

from absl import flags

from clip_jax import cli
from clip_jax.data import scenes

_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 20_000, "Training scenes.", lower_bound=1)
_NUM_EVAL = flags.DEFINE_integer("num_eval", 300, "Scenes in each held-out set.", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image side in pixels.", lower_bound=8)
_VOCAB = flags.DEFINE_integer("vocab_size", 128, "Tokenizer vocabulary ceiling.", lower_bound=5)
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")


def main(argv):
    del argv
    start = time.perf_counter()
    dataset = scenes.ensure_dataset(
        _OUT.value,
        num_train=_NUM_TRAIN.value,
        num_heldout_things=_NUM_EVAL.value,
        num_heldout_scenes=_NUM_EVAL.value,
        image_size=_IMAGE_SIZE.value,
        vocab_size=_VOCAB.value,
        seed=_SEED.value,
    )
    print(f"wrote {dataset} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    cli.run(main)
