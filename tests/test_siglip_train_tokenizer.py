"""Training with a SigLIP-layout sentencepiece model (pad 0, EOS 1, as SigLIP's c4_en and
SigLIP 2's Gemma models): `tokenizer.Tokenizer` gives the ids `siglip_tokenizer` gives at
inference, ``config.data.tokenizer_layout`` names the layout expected, a model in neither
layout is refused naming it; and LiT from an imported SigLIP-layout model trains with it."""

import json
import os
import pickle

import flax.linen as nn
import jax
import numpy as np
import pytest
import sentencepiece as spm
from conftest import load_config

from clip_jax import inference, recipe, train
from clip_jax.data import scenes, siglip_tokenizer
from clip_jax.data.tokenizer import Tokenizer, TokenizerFileError
from clip_jax.interop import files
from clip_jax.models import clip

CONTEXT = 16
CAPTIONS = [
    "a large red bar to the left of a small circle",
    "A Small Cyan TRIANGLE!",
    "a cross above a plain bar, below a pink circle " * 3,  # longer than the context
    "",
    "an unseen zebra",
]


def train_spm(path, **ids):
    corpus = [f"a {size} {colour} {shape}" for size in scenes.SIZES for colour in scenes.COLOURS
              for shape in scenes.SHAPES] + [f"{r} a plain thing" for r in scenes.RELATIONS]  # fmt: skip
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 5), model_prefix=str(path)[: -len(".model")], vocab_size=80,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        minloglevel=2, **ids,
    )  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory):
    """T5's c4_en ids, as SigLIP ships: pad 0, EOS 1, UNK 2, no BOS."""
    return train_spm(tmp_path_factory.mktemp("spm") / "c4.model", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


def test_training_ids_are_the_inference_ids(siglip_model):
    tok = Tokenizer(siglip_model, CONTEXT)
    ids = tok(CAPTIONS)
    assert tok.layout == "siglip" and tok.eos_id == 1 and tok.bos_id is None
    np.testing.assert_array_equal(ids, siglip_tokenizer.SiglipTokenizer(siglip_model, CONTEXT)(CAPTIONS))
    np.testing.assert_array_equal(ids, inference.make_tokenizer(siglip_model, CONTEXT)(CAPTIONS))
    # big_vision's layout, independently: pieces of the canonical text, no BOS, EOS last, EOS padding.
    sp = spm.SentencePieceProcessor(model_file=siglip_model)
    for text, row in zip(CAPTIONS, ids.tolist(), strict=True):
        pieces = sp.encode(siglip_tokenizer.canonicalize(text))[: CONTEXT - 1]
        assert row == pieces + [1] * (CONTEXT - len(pieces)), text
    assert ids[2, -1] == 1 and 1 not in ids[2, :-1]  # cut, still ends with EOS
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(CAPTIONS), ids)
    np.testing.assert_array_equal(Tokenizer(siglip_model, CONTEXT, "siglip")(CAPTIONS), ids)


def test_the_layout_option_is_checked(siglip_model, tmp_path):
    with pytest.raises(TokenizerFileError, match="not config.data.tokenizer_layout 'clip_jax'"):
        Tokenizer(siglip_model, CONTEXT, "clip_jax")
    with pytest.raises(TokenizerFileError, match="tokenizer_layout='t5' is unknown"):
        Tokenizer(siglip_model, CONTEXT, "t5")
    neither = train_spm(tmp_path / "neither.model", pad_id=3, eos_id=2, unk_id=0, bos_id=1)
    with pytest.raises(TokenizerFileError, match="pad 3, unk 0, bos 1, eos 2, which is not config.data"):
        Tokenizer(neither, CONTEXT)
    ours = train_spm(tmp_path / "ours.model", pad_id=0, unk_id=1, bos_id=2, eos_id=3)
    assert Tokenizer(ours, CONTEXT, "clip_jax").layout == "clip_jax"
    assert Tokenizer(ours, CONTEXT)(["a circle"])[0, 0] == 2  # BOS first, as before


@pytest.mark.slow
def test_lit_from_a_siglip_model_trains_with_its_tokenizer(tmp_path, scenes_dataset, siglip_model):
    config = load_config("demo_siglip")
    config.data.scenes = None  # the scenes' shards, captioned with SigLIP's tokenizer
    config.eval.evaluators = {}  # the demo's scenes evaluator needs the scenes
    config.data.train_files = ",".join(scenes_dataset.train_files)
    config.data.tokenizer = siglip_model
    config.data.tokenizer_layout = "siglip"
    config.train.update(batch_size=64, total_steps=12, log_every=1)
    config.optim.update(warmup_steps=2, lr=2e-3, freeze=("^visual/",))
    config.checkpoint.every = 1000
    vocab = Tokenizer(siglip_model, CONTEXT).vocab_size
    model = recipe.build_model(config, vocab)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(7), *clip.dummy_inputs(model.config))["params"])
    weights, _ = files.save(
        str(tmp_path / "bv"),
        jax.tree.map(np.asarray, params),
        model.config,
        "big_vision",
        eos_id=1,
        bos_id=None,
    )
    config.train.init_from = weights
    result = train.run(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    visual = jax.tree.leaves(result["state"].params["visual"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["visual"]), visual, strict=True))
    loaded = inference.load(str(tmp_path / "run"))  # the run's tokenizer, as inference reads it
    np.testing.assert_array_equal(loaded.tokenizer(CAPTIONS), Tokenizer(siglip_model, CONTEXT)(CAPTIONS))
    assert os.path.exists(tmp_path / "run" / "config.json")
