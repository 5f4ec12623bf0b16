"""The filter, dedup and --exclude flags every converter command shares.

`define()` is called by a command at module level (commands are only run as
programs); the function it returns builds the `convert.Options`, checked: a
limit that can never be met, or an exclude file that is missing or not a hash
list, is a `cli.UserError` naming the flag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import flags

from clip_jax import cli, storage
from clip_jax.data import convert, dedup, filters


def define() -> Callable[..., convert.Options]:
    """Defines --min_side, --max_aspect, --min_caption_chars, --max_caption_chars, --dedup,
    --near_dup_bits and --exclude; returns ``options(**kw)``: those flags + ``kw`` (size,
    quality...) as `convert.Options`."""
    min_side = flags.DEFINE_integer("min_side", 0, "Drop images whose short side is under this (0: off).")
    max_aspect = flags.DEFINE_float("max_aspect", 0.0, "Drop images with long/short side over this (0: off).")
    min_chars = flags.DEFINE_integer("min_caption_chars", 0, "Drop captions shorter than this (0: off).")
    max_chars = flags.DEFINE_integer("max_caption_chars", 0, "Drop captions longer than this (0: off).")
    dedup_flag = flags.DEFINE_bool(
        "dedup", False, "Drop byte-identical (sha256) and re-encoded (dhash) duplicate images."
    )
    near_bits = flags.DEFINE_integer(
        "near_dup_bits",
        0,
        f"With --dedup: dhashes at most this many bits apart are copies too (0: equal dhashes only; "
        f"at most {dedup.MAX_NEAR_BITS}).",
    )
    exclude = flags.DEFINE_string(
        "exclude", None, "A file of image hashes (data_pipelines/eval_hashes.py) to drop: decontamination."
    )

    def options(**kw: Any) -> convert.Options:
        chosen = filters.Filters(min_side.value, max_aspect.value, min_chars.value, max_chars.value)
        try:
            filters.validate(chosen)
        except ValueError as e:
            raise cli.UserError(f"--min_side/--max_aspect/--*_caption_chars: {e}") from None
        try:
            dedup.check_near_bits(near_bits.value)
        except ValueError as e:
            raise cli.UserError(f"--{e}") from None
        if near_bits.value and not dedup_flag.value:
            raise cli.UserError(f"--near_dup_bits={near_bits.value} needs --dedup (it says what a copy is)")
        if exclude.value:
            if not storage.exists(exclude.value):
                raise cli.UserError(f"--exclude={exclude.value}: no such file (write it with eval_hashes.py)")
            try:
                dedup.load_exclude(exclude.value)
            except ValueError as e:
                raise cli.UserError(f"--exclude: {e}") from None
        return convert.Options(
            filters=chosen, dedup=dedup_flag.value, near_dup_bits=near_bits.value, exclude=exclude.value, **kw
        )

    return options
