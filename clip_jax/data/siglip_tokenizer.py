"""SigLIP's token layout for its own sentencepiece models, used as shipped.

big_vision tokenises SigLIP captions with ``tokenize(max_len=64, eos="sticky",
pad_value=1)`` (``pp/ops_text.py``; the SigLIP and SigLIP 2 demo colabs): the text
is lower-cased, encoded with no BOS, and EOS is appended; a longer text keeps its
first 63 pieces and still ends with EOS ("sticky"); a shorter one is padded with
id 1, which is EOS itself in both shipped models (T5's ``c4_en`` for SigLIP:
pad 0, EOS 1, UNK 2, no BOS; Gemma's for SigLIP 2: pad 0, EOS 1, BOS 2, UNK 3).
The text tower pools the last position, which therefore always holds EOS.

transformers' ``SiglipTokenizer`` also canonicalises the text as big_vision's
zero-shot prompts are (``prompt_engineering.canonicalize_text``): ASCII
punctuation removed, whitespace runs collapsed to one space, ends stripped.
``canonicalize=True`` (the default) does the same, so ids equal transformers'
``tokenizer(texts, padding="max_length", max_length=64, truncation=True)``;
``canonicalize=False`` is big_vision's training preprocessing (ASCII lower-casing only).
Unlike transformers, a literal ``</s>`` in a caption is text, never an EOS id.
(transformers' ``Siglip2Tokenizer`` pads with ``<pad>`` = 0 on the left and adds
no EOS; big_vision, which trained SigLIP 2, pads as above.)
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from clip_jax import storage

CONTEXT_LENGTH = 64  # SigLIP's and SigLIP 2's text length
# Characters kept per context slot before encoding (a piece is at most 16 characters
# by sentencepiece's default), so a 1 MB caption costs what a short one costs.
CHARS_PER_TOKEN = 16
# Shorter lists are encoded one text at a time (see `clip_jax.data.tokenizer`).
BATCH_ENCODE_MIN = 256
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def canonicalize(text: str) -> str:
    """big_vision's ``canonicalize_text``: lower-case, no ASCII punctuation, single spaces, stripped."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


def is_siglip_model(model_path: str) -> bool:
    """Whether a sentencepiece model has SigLIP's special ids (EOS 1, pad 0), not clip_jax's (EOS 3).

    A file that is no sentencepiece model is not SigLIP's: `tokenizer.Tokenizer` then names it."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(model_path))
    except (RuntimeError, OSError):
        return False
    return sp.eos_id() == 1 and sp.pad_id() == 0


class SiglipTokenizer:
    """Callable: list of captions -> [N, context_length] int32 in SigLIP's layout."""

    def __init__(self, model_path: str, context_length: int = CONTEXT_LENGTH, canonicalize: bool = True):
        self.model_path = model_path
        self.context_length = context_length
        self.canonicalize = canonicalize
        self._sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(model_path))
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {model_path} has no EOS piece; SigLIP's layout ends with EOS")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _text(self, text: str) -> str:
        # tf.strings.lower (big_vision's training pp) lower-cases ASCII only.
        text = canonicalize(text) if self.canonicalize else text.translate(_ASCII_LOWER)
        return text[: self.context_length * CHARS_PER_TOKEN]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        cut = [self._text(t) for t in texts]
        pieces = [self._sp.encode(t) for t in cut] if len(cut) < BATCH_ENCODE_MIN else self._sp.encode(cut)
        out = np.full((len(texts), self.context_length), self.eos_id, np.int32)  # padded with EOS
        for row, ids in zip(out, pieces, strict=True):
            row[: min(len(ids), self.context_length - 1)] = ids[: self.context_length - 1]
        return out

    def __getstate__(self):  # picklable for Grain worker processes
        return {k: getattr(self, k) for k in ("model_path", "context_length", "canonicalize")}

    def __setstate__(self, state):
        self.__init__(**state)
