"""Inference: ``clip_jax.load(path)`` -> a model with its weights, tokenizer and preprocessing.

    model = clip_jax.load("/tmp/clip_emoji")             # a run's latest checkpoint
    image_emb = model.encode_image(["cat.png", pil_image])  # [N, E], unit norm
    text_emb = model.encode_text(["a cat", "a dog"])        # [M, E], unit norm
    probs = model.probabilities(image_emb, text_emb)         # [N, M]: softmax over M (CLIP),
                                                             # per-pair sigmoid (SigLIP)

``path`` is any of: a clip_jax workdir (``config.json`` + ``checkpoints/``; the latest
step), a ``params`` export (``python -m clip_jax.export --format=params``, which
carries the run's ``tokenizer.model``), an HF ``CLIPModel`` directory (with the CLIP
BPE's ``vocab.json`` + ``merges.txt`` beside the weights for text), or an
OpenAI/open_clip state dict (see `clip_jax.interop.files.load`).

Preprocessing is evaluation's: decode (EXIF, alpha over white), resize the short side
(bicubic), centre-crop, CLIP's mean/std on device.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from clip_jax import cli, storage
from clip_jax.data import bounded, siglip_tokenizer, transforms
from clip_jax.interop import adapt, files, mapping, openai_resnet
from clip_jax.interop import overrides as overrides_lib
from clip_jax.models import clip

SENTENCEPIECE = "tokenizer.model"
BPE_VOCAB, BPE_MERGES = "vocab.json", "merges.txt"


def is_workdir(path: str) -> bool:
    return storage.exists(os.path.join(path, "config.json")) and storage.isdir(
        os.path.join(path, "checkpoints")
    )


def load_weights(
    path: str, step: int | None = None, overrides: Any = None, allow_code: bool = False
) -> tuple[clip.CLIPConfig, dict, str | None]:
    """(CLIPConfig, weights as nested float32 numpy, tokenizer file or None) of anything `load` reads.

    ``allow_code``: let a TorchScript archive run its own code (see `files.read_tensors`).

    Scanned (stacked) blocks are split into ``block_i``; a ResNet tower's BatchNorm
    statistics stay under the top-level ``batch_stats`` key. ``overrides``: see `files.load`.
    """
    if is_workdir(path):
        config, params, tokenizer = _from_workdir(path, step)
        files.check_recorded(config, overrides_lib.coerce(overrides), os.path.join(path, "config.json"))
        return config, mapping.stack_free(params), tokenizer
    config, params = files.load(path, overrides, allow_code=allow_code)
    folder = path if storage.isdir(path) else os.path.dirname(path)
    tokenizer = None
    if storage.exists(os.path.join(folder, SENTENCEPIECE)):
        tokenizer = os.path.join(folder, SENTENCEPIECE)
    elif storage.exists(os.path.join(folder, BPE_VOCAB)) and storage.exists(os.path.join(folder, BPE_MERGES)):
        tokenizer = os.path.join(folder, BPE_VOCAB)
    return config, params, tokenizer


def _from_workdir(path: str, step: int | None) -> tuple[clip.CLIPConfig, dict, str]:
    """A run's (CLIPConfig, weights, tokenizer file), read by `clip_jax.workdir.load`."""
    from clip_jax import workdir  # orbax, grain: only for workdirs

    run = workdir.load(path, step)
    return run.model.config, run.params, run.tokenizer_path


def make_tokenizer(path: str, context_length: int) -> Callable[[Sequence[str]], np.ndarray]:
    """A sentencepiece ``.model``, or CLIP's BPE from ``vocab.json`` (+ ``merges.txt`` beside it)."""
    if path.endswith(".json"):
        from clip_jax.data.clip_bpe import ClipBpeTokenizer

        return ClipBpeTokenizer(path, os.path.join(os.path.dirname(path), BPE_MERGES), context_length)
    if siglip_tokenizer.is_siglip_model(path):  # SigLIP's own model (EOS 1): its layout, as shipped
        return siglip_tokenizer.SiglipTokenizer(path, context_length)
    from clip_jax.data.tokenizer import Tokenizer

    return Tokenizer(path, context_length)


class VocabularyMismatch(cli.UserError, ValueError):
    """A tokenizer with ids the model has no embedding for."""


def check_vocab(tokenizer_vocab: int, model_vocab: int, tokenizer: str) -> None:
    """Refuses a tokenizer with ids the model has no embedding for: such an id would read past
    the token table (NaN or garbage text embeddings), not fail."""
    if tokenizer_vocab > model_vocab:
        raise VocabularyMismatch(
            f"tokenizer {tokenizer} has {tokenizer_vocab} tokens but the model's vocabulary is "
            f"{model_vocab}: ids >= {model_vocab} have no embedding; use the model's own tokenizer"
        )


def read_image(item: Any) -> Image.Image:
    """A path, encoded bytes or a PIL image -> RGB PIL image. Raises OSError / `BadRecord`
    (a path is read only when it is a regular file of at most `bounded.MAX_MEMBER_BYTES`)."""
    if isinstance(item, Image.Image):
        return transforms.to_rgb(item)
    if isinstance(item, str | os.PathLike):
        item = bounded.read_bytes(os.fspath(item))
    return transforms.decode_image(item)


@dataclasses.dataclass
class CLIPModel:
    """A loaded model. ``params`` is the weights tree (plus ``batch_stats`` for a ResNet)."""

    model: clip.CLIP
    params: dict
    tokenizer: Callable[[Sequence[str]], np.ndarray] | None
    source: str
    batch_size: int = 64

    def __post_init__(self):
        self._variables = jax.device_put(openai_resnet.split_variables(self.params))
        apply = self.model.apply
        self._image = jax.jit(lambda v, x: apply(v, transforms.normalize(x), method=clip.CLIP.encode_image))
        self._text = jax.jit(lambda v, t: apply(v, t, method=clip.CLIP.encode_text))

    @property
    def config(self) -> clip.CLIPConfig:
        return self.model.config

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the temperature's inverse the model was trained with."""
        return float(np.exp(self.params["logit_scale"]))

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's learned logit bias; None for a model without one (CLIP's softmax)."""
        return float(self.params["logit_bias"]) if "logit_bias" in self.params else None

    def preprocess(self, item: Any) -> np.ndarray:
        """One image (path, bytes, PIL, or uint8 array [H, W, 3]) -> uint8 [S, S, 3]."""
        if isinstance(item, np.ndarray):
            item = Image.fromarray(item.astype(np.uint8))
        return transforms.resize_center_crop(read_image(item), self.image_size)

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        """Runs ``fn`` over batches; a short batch is padded to a power of two (few compiles)."""
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i : i + self.batch_size]
            size = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(fn(self._variables, padded))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    def encode_image(self, images: Any) -> np.ndarray:
        """uint8 [N, S, S, 3] (already preprocessed), or a list of paths / PIL images /
        arrays -> unit-norm float32 [N, E]."""
        is_batch = isinstance(images, np.ndarray) and images.ndim == 4
        if not (is_batch and images.shape[1:3] == (self.image_size, self.image_size)):
            images = (
                np.stack([self.preprocess(x) for x in images])
                if len(images)
                else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
            )
        return self._batched(self._image, np.asarray(images, np.uint8))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> unit-norm float32 [N, E]."""
        if self.tokenizer is None:
            raise ValueError(
                f"{self.source}: no tokenizer found ({SENTENCEPIECE}, or {BPE_VOCAB} + {BPE_MERGES} "
                "beside the weights); pass load(..., tokenizer=PATH)"
            )
        return self._batched(self._text, self.tokenizer(list(texts)))

    def probabilities(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """[N, E] x [M, E] -> [N, M], as the model was trained: a model with a logit bias
        (SigLIP) gives each pair its own ``sigmoid(logit_scale * cosine + logit_bias)``
        (rows need not sum to 1: no text, or several, may match); one without (CLIP) a
        softmax over the texts of ``logit_scale * cosine``."""
        logits = self.logit_scale * jnp.asarray(image_emb @ text_emb.T)
        if self.logit_bias is not None:
            return np.asarray(jax.nn.sigmoid(logits + self.logit_bias))
        return np.asarray(jax.nn.softmax(logits, axis=-1))


def load(
    path: str,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
    batch_size: int = 64,
    dtype: str = "float32",
    overrides: Any = None,
    allow_code: bool = False,
) -> CLIPModel:
    """Loads a workdir, export or imported directory (see the module docstring) for inference.

    ``tokenizer``: a sentencepiece ``.model`` or a CLIP BPE ``vocab.json``, when none
    is found with the weights. ``step``: a workdir's checkpoint (default: the latest).
    ``overrides``: what a bare OpenAI/open_clip state dict does not record, e.g.
    ``dict(vision_heads=16, text_heads=16, activation="gelu")`` (`files.load`).
    ``allow_code``: see `load_weights`. Raises ValueError for a tokenizer whose ids
    do not fit the model's vocabulary.
    """
    config, params, found = load_weights(path, step, overrides, allow_code)
    tokenizer = tokenizer or found
    tok = make_tokenizer(tokenizer, config.text.context_length) if tokenizer else None
    if tok is not None:
        check_vocab(tok.vocab_size, config.text.vocab_size, tokenizer)
    model = clip.CLIP(config, dtype=jnp.dtype(dtype))
    return CLIPModel(model, params, tok, path, batch_size)


def matching_variables(
    path: str, params: Any, model_state: Any = None, overrides: Any = None
) -> tuple[dict, Any]:
    """(params, model_state): the weights at ``path`` in the layout of ``params`` and
    ``model_state`` (a model's trees or their abstract shapes), for ``config.train.init_from``.

    Every parameter must be there with its shape, except ``logit_bias`` (SigLIP from a
    CLIP), which keeps the reference's. A ResNet tower's ``batch_stats`` (in
    ``model_state``) come from the file too: fine-tuning an imported RN50 keeps its
    BatchNorm statistics. Raises ValueError naming what is missing, extra or mis-shaped.
    ``overrides``: ``config.train.init_from_overrides`` (`files.load`).
    """
    try:
        _, weights, _ = load_weights(path, overrides=overrides)
    except overrides_lib.OverridesError as e:  # name the config field, not the command-line flag
        raise overrides_lib.OverridesError(
            f"config.train.init_from={path!r}: {e}; in a config: config.train.init_from_overrides"
        ) from None
    stats = weights.pop(openai_resnet.BATCH_STATS, None)
    params = _matching(path, weights, params, optional={"logit_bias"})
    if model_state and openai_resnet.BATCH_STATS in model_state:
        if stats is None:
            raise ValueError(f"config.train.init_from={path!r} has no BatchNorm statistics for the ResNet")
        model_state = {
            **model_state,
            openai_resnet.BATCH_STATS: _matching(path, stats, model_state[openai_resnet.BATCH_STATS]),
        }
    return params, model_state


def _matching(path: str, weights: dict, reference: Any, optional: set[str] = frozenset()) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(reference)
    want = {"/".join(str(getattr(k, "key", k)) for k in p): leaf for p, leaf in leaves}
    have = mapping.flatten(adapt.fit(weights, reference))  # a new image size; scanned blocks
    missing = sorted(set(want) - set(have) - optional)
    extra = sorted(set(have) - set(want))
    shapes = [
        f"{k}: {have[k].shape} != {want[k].shape}"
        for k in sorted(set(want) & set(have))
        if tuple(have[k].shape) != tuple(want[k].shape)
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"config.train.init_from={path!r} does not fit config.model (variant, context_length, "
            f"the tokenizer's vocabulary): missing {missing[:5]}, extra {extra[:5]}, shapes {shapes[:5]}"
        )
    flat = {k: np.asarray(have[k], want[k].dtype) if k in have else want[k] for k in want}
    return mapping.unflatten(flat)
