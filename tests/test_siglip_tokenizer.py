"""SigLIP's token layout against transformers' SiglipTokenizer on the same tiny sentencepiece
model (trained here with T5's c4_en ids: pad 0, EOS 1, UNK 2, no BOS), and big_vision's
"sticky EOS, padded with 1" rule with a Gemma-layout model (pad 0, EOS 1, BOS 2, UNK 3)."""

import pickle

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from clip_jax.data import siglip_tokenizer
from clip_jax.data.siglip_tokenizer import SiglipTokenizer

CORPUS = [
    "a photo of a cat", "a photo of a dog on the grass", "two red circles and a blue square",
    "the quick brown fox jumps over the lazy dog", "café crème brûlée", "日本語のテキスト",
    "numbers 123 and 4.5 percent", "emoji 🐱 and 🐶", "under_score and dash-words", "it is what it is",
] * 20  # fmt: skip
TRICKY = [
    "A Photo of a CAT.",
    "  leading and   trailing\tspaces\n\n",
    "punctuation!!! ,,, ?? (brackets) [x] {y} 'quotes' \"double\" #hash $5 @at",
    "Café CRÈME Brûlée",  # non-ASCII upper case
    "日本語のテキスト",
    "emoji 🐱🐶 together",
    "",
    "...!!!",
    "under_score-dash/slash\\back",
    "numbers 123 4.5",
    "it's Bob's",
    "the quick brown fox jumps over the lazy dog " * 4,  # longer than the context
    "unseen zebra xylophone",
]
CONTEXT = 16


def train(tmp_path, name, **ids):
    path = str(tmp_path / f"{name}.model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=path[: -len(".model")], vocab_size=120,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        minloglevel=2, **ids,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def c4_layout(tmp_path_factory):
    return train(tmp_path_factory.mktemp("spm"), "c4", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


def test_ids_equal_transformers_siglip_tokenizer(c4_layout):
    theirs = transformers.SiglipTokenizer(vocab_file=c4_layout)
    expected = theirs(TRICKY, padding="max_length", max_length=CONTEXT, truncation=True)["input_ids"]
    ours = SiglipTokenizer(c4_layout, CONTEXT)(TRICKY)
    for text, a, b in zip(TRICKY, ours.tolist(), expected, strict=True):
        assert a == b, text
    assert ours.dtype == np.int32 and ours.shape == (len(TRICKY), CONTEXT)
    assert siglip_tokenizer.is_siglip_model(c4_layout)


def test_short_and_long_lists_give_the_same_ids(c4_layout):
    tok = SiglipTokenizer(c4_layout, CONTEXT)  # short lists: one text at a time; long: one batch
    np.testing.assert_array_equal(tok(TRICKY), tok(TRICKY * siglip_tokenizer.BATCH_ENCODE_MIN)[: len(TRICKY)])


def test_sticky_eos_and_eos_padding(c4_layout):
    tok = SiglipTokenizer(c4_layout, CONTEXT)
    short, long, literal = tok(["a cat", "the quick brown fox jumps " * 10, "a </s> b"])
    assert short[-1] == 1 and long[-1] == 1 and 1 not in long[:-1]  # cut, and still ends with EOS
    assert list(short[np.argmax(short == 1) :]) == [1] * (CONTEXT - np.argmax(short == 1))  # EOS, then pad 1
    assert 1 not in literal[: np.argmax(literal == 1)] and np.argmax(literal == 1) > 2  # "</s>" is text
    assert pickle.loads(pickle.dumps(tok))(["a cat"]).tolist() == tok(["a cat"]).tolist()


def test_gemma_layout_follows_big_visions_rule(tmp_path):
    path = train(tmp_path, "gemma", pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    sp = spm.SentencePieceProcessor(model_file=path)
    texts = ["A Photo, of a CAT!", "Café  CRÈME", "the quick brown fox jumps " * 5]
    for text, row in zip(texts, SiglipTokenizer(path, CONTEXT, canonicalize=False)(texts), strict=True):
        ascii_lower = "".join(c.lower() if c.isascii() else c for c in text)  # tf.strings.lower
        ids = sp.encode(ascii_lower)[: CONTEXT - 1] + [1]  # no BOS; EOS kept when cut
        assert row.tolist() == ids + [1] * (CONTEXT - len(ids)), text
    assert 2 not in SiglipTokenizer(path, CONTEXT)(texts)  # never a BOS
