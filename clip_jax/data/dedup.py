"""Image hashes for deduplication and decontamination.

Two hashes per image, so both kinds of copy are caught:

* ``sha256`` of the input bytes: byte-identical files (the cheap, certain case);
* ``dhash``: a 64-bit difference hash of the decoded image (grayscale, area-averaged
  to 9x8, one bit per horizontally adjacent pair): the same picture re-encoded
  (another format, JPEG quality, or resolution) gets the same hash.

Near duplicates are matched by EXACT ``dhash`` equality, not by a Hamming distance:
equality is a key a distributed group-by (Beam) can shuffle on, and a lookup in
a set; it misses copies edited enough to flip a bit (crops, overlays, strong
recompression). A flat image (dhash 0, shared by every solid colour) is matched by
its bytes only. Hashes are written as ``sha256:HEX`` and ``dhash:HEX`` lines
(`format_hashes`), the format of ``--exclude`` files (data_pipelines/eval_hashes.py).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from clip_jax import storage

KINDS = ("sha256", "dhash")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dhash(img: Image.Image) -> str:
    """The 64-bit difference hash of a decoded image, 16 hex digits."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.BOX), np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def image_hashes(data: bytes | np.ndarray | None, img: Image.Image) -> dict[str, str]:
    """{"sha256": of the input bytes (pixels: of their array bytes), "dhash": of ``img``}."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else (data or b"")
    return {"sha256": sha256(raw), "dhash": dhash(img)}


FLAT = "0" * 16  # the dhash of every image without a horizontal gradient (all solid colours)


def format_hashes(hashes: dict[str, str]) -> list[str]:
    """``kind:hex`` lines; a `FLAT` dhash is left out (it would match every solid colour),
    so such images are matched by their bytes only."""
    return [f"{kind}:{hashes[kind]}" for kind in KINDS if kind in hashes and hashes[kind] != FLAT]


def load_exclude(path: str) -> frozenset[str]:
    """The ``kind:hex`` lines of an exclude file; raises ValueError naming the file and line
    for anything else (a list that silently matches nothing would leave eval images in)."""
    out = set()
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, value = line.partition(":")
        if kind not in KINDS or not value or any(c not in "0123456789abcdef" for c in value):
            raise ValueError(f"{path}:{n}: expected 'sha256:HEX' or 'dhash:HEX', got {line[:80]!r}")
        out.add(line)
    return frozenset(out)


def excluded(hashes: dict[str, str], exclude: frozenset[str]) -> bool:
    """Whether any of ``hashes`` is in ``exclude`` (lines as `load_exclude` returns them)."""
    return any(h in exclude for h in format_hashes(hashes))


def drop_reason(hashes: dict[str, str] | None, exclude: frozenset[str], seen: set[str] | None) -> str | None:
    """Why a record with ``hashes`` is dropped, or None: ``eval_excluded`` (in ``exclude``),
    ``duplicate_exact`` (its sha256 in ``seen``), ``duplicate_near`` (its dhash in ``seen``).
    Adds its hashes to ``seen`` (None: no dedup); the first copy seen survives."""
    if hashes is None:
        return None
    if exclude and excluded(hashes, exclude):
        return "eval_excluded"
    if seen is None:
        return None
    exact, *near = format_hashes(hashes)
    if exact in seen:
        return "duplicate_exact"
    seen.add(exact)
    if near and near[0] in seen:
        return "duplicate_near"
    seen.update(near)
    return None
