"""Conversion filters (image size, aspect ratio, caption length), shared by every converter.

One function per check, called by `convert.prepare` (the process-pool converter and
the Beam pipeline both go through it), so both keep and drop the same records.
A dropped record raises `skips.BadRecord` with its reason (``too_small``,
``extreme_aspect``, ``caption_too_short``, ``caption_too_long``) and is counted
by reason in the stats JSON. Every filter is off (0) by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clip_jax.data import skips


@dataclasses.dataclass(frozen=True)
class Filters:
    min_side: int = 0  # the short side of the decoded input image, in pixels; 0: any
    max_aspect: float = 0.0  # long side / short side; 0: any
    min_caption_chars: int = 0  # after stripping whitespace; 0: any non-empty caption
    max_caption_chars: int = 0  # 0: any length


def check_caption(caption: str, filters: Filters) -> None:
    """Raises `skips.BadRecord` when ``caption`` (already stripped) is outside the length limits."""
    n = len(caption)
    if filters.min_caption_chars and n < filters.min_caption_chars:
        raise skips.BadRecord("caption_too_short", f"{n} chars < {filters.min_caption_chars}")
    if filters.max_caption_chars and n > filters.max_caption_chars:
        raise skips.BadRecord("caption_too_long", f"{n} chars > {filters.max_caption_chars}")


def keep_captions(fields: dict[str, Any], filters: Filters) -> dict[str, Any]:
    """A record's caption fields (`captions.record_fields`) with only the captions inside the
    length limits; raises `skips.BadRecord` (the first caption's reason) when none is left."""
    texts = fields.get("captions") or [fields["caption"]]
    kept, first_error = [], None
    for text in texts:
        try:
            check_caption(text, filters)
        except skips.BadRecord as e:
            first_error = first_error or e
            continue
        kept.append(text)
    if not kept:
        raise first_error
    return {"caption": kept[0]} if len(kept) == 1 else {"caption": kept[0], "captions": kept}


def check_image(size: tuple[int, int], filters: Filters) -> None:
    """Raises `skips.BadRecord` when an image of ``size`` (w, h, before resizing) is too small
    or too elongated."""
    w, h = size
    short, long = min(w, h), max(w, h)
    if filters.min_side and short < filters.min_side:
        raise skips.BadRecord("too_small", f"{w}x{h}: short side < {filters.min_side}")
    if filters.max_aspect and long > filters.max_aspect * short:
        raise skips.BadRecord("extreme_aspect", f"{w}x{h}: aspect {long / short:.2f} > {filters.max_aspect}")


def validate(filters: Filters) -> None:
    """Raises ValueError naming the option for a limit that can never be met."""
    if filters.max_aspect and filters.max_aspect < 1:
        raise ValueError(f"max_aspect={filters.max_aspect}: must be >= 1 (long side / short side) or 0 (off)")
    lo, hi = filters.min_caption_chars, filters.max_caption_chars
    if lo < 0 or hi < 0 or filters.min_side < 0 or (hi and lo > hi):
        raise ValueError(f"caption/size limits must be >= 0 with min <= max; got {filters}")
