"""OpenAI's CLIP BPE against transformers' CLIPTokenizer, on a vocabulary trained here."""

import collections
import json
import os
import pickle

import numpy as np
import pytest

from clip_jax.data import clip_bpe

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

CORPUS = """a photo of a cat sitting on the red mat. a photo of two dogs playing in the park!
there's a café near the station; we'll meet at 10:30. don't worry, it's fine. they're here.
naïve résumé über straße 東京タワー の 写真 北京 😀 🎉 👍🏽 the the the photograph photographs
1,000,000 people 3.14 2nd place Ελληνικά λέξεις русский текст العربية हिन्दी"""

TRICKY = [
    "",
    "   ",
    "a photo of a cat.",
    "A Photo Of A CAT",
    "Hello,   World!!\n\tNew\u3000line",
    "don't you're we'll I'M he'd it's they've",
    "'s 't 'Re ''quoted'' rock'n'roll",
    "3.14159 and 1,000,000 and 2nd 1st 007",
    "café naïve résumé Ünïcödé",
    "cafe\u0301 e\u0301",  # combining accents: NFC composes them
    "東京タワーの写真 北京",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "ΟΔΟΣ ΣΊΣΥΦΟΣ",  # final sigma on lower-casing
    "İstanbul ß ﬁ Ⅻ ½ x² ٣",
    "a <|endoftext|> inside",
    "A<|startoftext|>B",
    "<|ENDOFTEXT|>",
    "tabs\tand\nnewlines\r\n\v\f",
    "\xa0nbsp\u2009thin\u200bzero\u2028sep",
    "!!!???... --- ###",
    "under_score snake_case https://example.com/a?q=1&b=2",
    "a" * 300,
    "a photograph of the park " * 200,
]


def byte_level_bpe_files(directory) -> tuple[str, str]:
    """An OpenAI-layout vocab.json/merges.txt: 256 byte symbols, the same with </w>, 300 merges
    learned on CORPUS (most frequent pair first), then the two special tokens."""
    byte_chars = clip_bpe.bytes_to_unicode()
    words = collections.Counter()
    for word in CORPUS.split():
        symbols = [byte_chars[b] for b in word.lower().encode("utf-8")]
        words[(*symbols[:-1], symbols[-1] + "</w>")] += 1
    merges = []
    for _ in range(300):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged_words = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged_words[tuple(out)] += n
        words = merged_words
    symbols = list(byte_chars.values())
    vocab = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [clip_bpe.SOT, clip_bpe.EOT]
    )
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({s: i for i, s in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return byte_level_bpe_files(str(tmp_path_factory.mktemp("bpe")))


@pytest.mark.parametrize("context_length", [77, 8])
def test_matches_transformers_clip_tokenizer(files, context_length):
    ours = clip_bpe.ClipBpeTokenizer(*files, context_length=context_length)
    hf = transformers.CLIPTokenizer.from_pretrained(os.path.dirname(files[0]))
    expected = hf(
        TRICKY, padding="max_length", truncation=True, max_length=context_length, return_tensors="np"
    )
    got = ours(TRICKY)
    assert got.dtype == np.int32 and got.shape == (len(TRICKY), context_length)
    mask = expected["attention_mask"].astype(bool)
    for text, row, hf_row, row_mask in zip(TRICKY, got, expected["input_ids"], mask, strict=True):
        assert row[row_mask].tolist() == hf_row[row_mask].tolist(), text[:60]
        assert (row[~row_mask] == clip_bpe.PAD_ID).all(), text[:60]
    assert ours.vocab_size == len(hf) == 2 * 256 + len(ours.ranks) + 2


def test_layout_merges_and_pickling(files):
    tok = clip_bpe.ClipBpeTokenizer(*files, context_length=6)
    photo = tok.encoder["photo</w>"]  # a merged word of the corpus: one token
    assert tok(["A PHOTO"])[0].tolist() == [tok.sot_id, tok.encoder["a</w>"], photo, tok.eot_id, 0, 0]
    long = tok(["photo " * 50])[0]
    assert long.tolist() == [tok.sot_id, photo, photo, photo, photo, tok.eot_id]  # EOT kept last
    assert tok([""])[0].tolist() == [tok.sot_id, tok.eot_id, 0, 0, 0, 0]
    assert tok.eot_id == tok.vocab_size - 1  # OpenAI's pooling (argmax of ids) finds it too
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(["a photo"]), tok(["a photo"]))
