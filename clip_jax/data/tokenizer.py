"""Sentencepiece tokenisation to fixed-length int32 ids, in one of two layouts.

``clip_jax`` (the ids `train_sentencepiece` gives a model: PAD = 0, UNK = 1, BOS = 2,
EOS = 3): ids are ``[BOS, piece..., EOS, PAD, ...]`` of exactly ``context_length``.
A caption longer than the context is cut and still ends with EOS, so the text tower
pools at the last non-pad token, which is always EOS. Text is NFKC-normalised and
case-folded by the model's normaliser (CLIP lower-cases).

``siglip`` (SigLIP's and SigLIP 2's shipped models: PAD = 0, EOS = 1): big_vision's
layout, `clip_jax.data.siglip_tokenizer` (no BOS, sticky EOS, padded with EOS; the text
canonicalised as at inference, so a model trains on the ids it is queried with).

The layout is read from the model's special ids (the two cannot be confused: EOS is 3
in one, 1 in the other); ``config.data.tokenizer_layout`` may name the one expected.
A model in neither is refused.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from clip_jax import cli, storage
from clip_jax.data import records, siglip_tokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
LAYOUTS = {
    "clip_jax": "pad 0, unk 1, bos 2, eos 3: data_pipelines/train_tokenizer.py makes one",
    "siglip": "pad 0, eos 1: SigLIP's and SigLIP 2's shipped models",
}
# Characters kept per context slot before encoding: a piece is rarely longer,
# and cutting first makes a 1 MB caption cost what a short one costs.
CHARS_PER_TOKEN = 16
# sentencepiece's list encode starts a thread pool per call (30-100 us, more under Grain's
# threads), where one caption takes ~2 us: lists shorter than this are encoded one text at
# a time (the same ids).
BATCH_ENCODE_MIN = 256


class TokenizerFileError(cli.UserError, ValueError):
    """A tokenizer file that is missing or not a usable sentencepiece model; names the file."""


def layout_of(sp: spm.SentencePieceProcessor) -> str | None:
    """The layout (a key of `LAYOUTS`) a sentencepiece model's special ids fit; None: neither."""
    if (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        return "clip_jax"
    if (sp.pad_id(), sp.eos_id()) == (0, 1):  # siglip_tokenizer.is_siglip_model's rule
        return "siglip"
    return None


class Tokenizer:
    """Callable: list of captions -> [N, context_length] int32.

    ``layout``: ``config.data.tokenizer_layout`` (None: the model's own, see the module
    docstring); a model that does not fit it, or fits no layout, is a `TokenizerFileError`.
    """

    def __init__(self, model_path: str, context_length: int, layout: str | None = None):
        self.model_path = model_path
        self.context_length = context_length
        self._sp = load_sentencepiece(model_path)
        if layout is not None and layout not in LAYOUTS:
            raise TokenizerFileError(
                f"config.data.tokenizer_layout={layout!r} is unknown; known: {sorted(LAYOUTS)}"
            )
        found = layout_of(self._sp)
        if found is None or layout not in (None, found):
            sp = self._sp
            ids = f"pad {sp.pad_id()}, unk {sp.unk_id()}, bos {sp.bos_id()}, eos {sp.eos_id()}"
            wanted = [layout] if layout else sorted(LAYOUTS)
            raise TokenizerFileError(
                f"tokenizer {model_path} has {ids}, which is not config.data.tokenizer_layout "
                + " or ".join(f"{name!r} ({LAYOUTS[name]})" for name in wanted)
            )
        self.layout = found
        self._siglip = (
            siglip_tokenizer.SiglipTokenizer(model_path, context_length) if found == "siglip" else None
        )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return EOS_ID if self._siglip is None else self._siglip.eos_id

    @property
    def bos_id(self) -> int | None:
        """None: the layout puts no BOS (SigLIP's)."""
        return BOS_ID if self._siglip is None else None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self._siglip is not None:
            return self._siglip(texts)
        max_chars = self.context_length * CHARS_PER_TOKEN
        cut = [t[:max_chars] for t in texts]
        pieces = [self._sp.encode(t) for t in cut] if len(cut) < BATCH_ENCODE_MIN else self._sp.encode(cut)
        out = np.zeros((len(texts), self.context_length), np.int32)
        for row, ids in zip(out, pieces, strict=True):
            ids = [BOS_ID, *ids[: self.context_length - 2], EOS_ID]
            row[: len(ids)] = ids
        return out

    def __getstate__(self):  # picklable for Grain worker processes
        return {"model_path": self.model_path, "context_length": self.context_length, "layout": self.layout}

    def __setstate__(self, state):
        self.__init__(**state)


def load_sentencepiece(model_path: str) -> spm.SentencePieceProcessor:
    """The sentencepiece model in ``model_path``; `TokenizerFileError` naming it when it is
    missing or not a model (a text file, a truncated download)."""
    try:
        data = storage.read_bytes(model_path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise TokenizerFileError(f"tokenizer {model_path}: {e.strerror or 'no such file'}") from None
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError:  # sentencepiece's only answer to bytes that do not parse as a model
        raise TokenizerFileError(
            f"tokenizer {model_path} is not a sentencepiece model; give a .model file "
            "(data_pipelines/train_tokenizer.py makes one) or a CLIP vocab.json"
        ) from None


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int) -> str:
    """Trains a BPE sentencepiece model (CLIP's kind) with our special ids; writes ``model_path``.

    ``vocab_size`` is a ceiling: a small corpus may give fewer pieces.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="nmt_nfkc_cf",
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    records.write_atomically(model_path, model.getvalue())
    return model_path
