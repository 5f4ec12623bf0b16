"""OpenAI's CLIP byte-level BPE, from the ``vocab.json`` + ``merges.txt`` shipped with HF CLIP weights.

Same call interface as `clip_jax.data.tokenizer.Tokenizer`: captions -> int32
[N, context_length] laid out ``[<|startoftext|>, tokens..., <|endoftext|>, 0, ...]``,
cut to keep ``<|endoftext|>`` last (OpenAI pads with 0 too). The text tower pools at
the last non-pad token, which is then ``<|endoftext|>``, as OpenAI's ``argmax`` does.

Text handling follows HF's ``CLIPTokenizer`` (transformers 5, no ftfy): the exact
strings ``<|startoftext|>``/``<|endoftext|>`` in a caption are their special ids; the
rest is NFC-normalised, whitespace runs become one space, lower-cased, split with
OpenAI's pattern (contractions, letter runs, single digits, punctuation runs), and
each piece is BPE-encoded over its UTF-8 bytes with ``</w>`` marking the word end.
OpenAI's original also runs ftfy and ``html.unescape``; captions that need them
tokenise differently.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterator, Sequence

import numpy as np
import regex

from clip_jax import storage

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
PAD_ID = 0
END_OF_WORD = "</w>"
SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
WHITESPACE = regex.compile(r"\s+")
# OpenAI's pattern without its special-token alternatives: HF's byte-level step splits
# "<|endoftext|>" made by lower-casing "<|ENDOFTEXT|>" into "<|", "endoftext", "|>" again.
PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# A longer piece (a "word" of thousands of letters) is cut before BPE, whose cost is
# quadratic in the piece length; real words are far shorter.
MAX_PIECE_CHARS = 256


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def normalize(text: str) -> str:
    """HF CLIPTokenizer's normaliser: NFC, whitespace runs -> one space, lower case."""
    text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    if "\u03a3" in text:  # HF lower-cases char by char: capital sigma is always "σ", never final "ς"
        return "".join(c.lower() for c in text)
    return text.lower()


def read_merges(path: str) -> list[tuple[str, str]]:
    """``merges.txt``: an optional ``#version`` line, then one "left right" pair per line, by rank."""
    lines = storage.read_text(path).split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split()) for line in lines if line.strip()]


class ClipBpeTokenizer:
    """Callable: list of captions -> [N, context_length] int32 (OpenAI's CLIP BPE)."""

    def __init__(self, vocab_path: str, merges_path: str, context_length: int = 77):
        self.vocab_path, self.merges_path = vocab_path, merges_path
        self.context_length = context_length
        self.encoder: dict[str, int] = storage.read_json(vocab_path)
        self.ranks = {pair: rank for rank, pair in enumerate(read_merges(merges_path))}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.byte_chars = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, piece: str) -> list[str]:
        """One pre-tokenised piece (already byte-mapped) -> its BPE symbols."""
        word = [*piece[:-1], piece[-1] + END_OF_WORD]
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # every occurrence of the best pair, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _piece_ids(self, piece: str) -> list[int]:
        if piece not in self._cache:
            mapped = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
            # A symbol outside the vocabulary is HF's unknown token, <|endoftext|>.
            ids = [self.encoder.get(symbol, self.eot_id) for symbol in self.bpe(mapped)]
            if len(self._cache) < 100_000:
                self._cache[piece] = ids
        return self._cache[piece]

    def iter_ids(self, text: str) -> Iterator[int]:
        """The token ids of ``text`` (no start/end tokens), lazily: a caller may stop early."""
        for i, segment in enumerate(SPECIAL.split(text)):
            if i % 2:  # a special token, written literally (HF matches these case-sensitively)
                yield self.encoder[segment]
                continue
            for match in PIECES.finditer(normalize(segment)):
                yield from self._piece_ids(match.group()[:MAX_PIECE_CHARS])

    def encode(self, text: str) -> list[int]:
        """``[<|startoftext|>, ids..., <|endoftext|>]``, at most ``context_length`` long."""
        ids = []
        for token in self.iter_ids(text):
            if len(ids) == self.context_length - 2:
                break
            ids.append(token)
        return [self.sot_id, *ids, self.eot_id]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.full((len(texts), self.context_length), PAD_ID, np.int32)
        for row, text in zip(out, texts, strict=True):
            ids = self.encode(text)
            row[: len(ids)] = ids
        return out

    def __getstate__(self):  # picklable for Grain worker processes
        return {
            "vocab_path": self.vocab_path,
            "merges_path": self.merges_path,
            "context_length": self.context_length,
        }

    def __setstate__(self, state):
        self.__init__(**state)
