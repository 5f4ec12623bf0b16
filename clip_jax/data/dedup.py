"""Image hashes for deduplication and decontamination.

Two hashes per image, so both kinds of copy are caught:

* ``sha256`` of the input bytes: byte-identical files (the cheap, certain case);
* ``dhash``: a 64-bit difference hash of the decoded image (grayscale, area-averaged
  to 9x8, one bit per horizontally adjacent pair): the same picture re-encoded
  (another format, JPEG quality, or resolution) gets the same hash.

Near duplicates are matched by ``dhash`` within a Hamming distance of ``near_bits``
(``--near_dup_bits``, 0 to `MAX_NEAR_BITS`):

* 0 (the default): EXACT ``dhash`` equality, a key a distributed group-by (Beam) can
  shuffle on and a lookup in a set; it misses copies edited enough to flip a bit
  (crops, overlays, strong recompression, a small edit).
* 1 to 3: the 64-bit hash is cut into `BANDS` = 4 bands of 16 bits; two hashes at most
  3 bits apart agree on at least one whole band (pigeonhole), so the band values are
  exact keys for candidate lookup (`band_keys`: a dict here, a group-by on Beam) and only
  the candidates sharing a band are compared bit by bit (`hamming`). Cost: each image
  is compared with the images sharing one of its bands, about 4 N / 65536 of N spread
  hashes (a few thousand at 400M images: numpy popcounts, not pairs of all N). A band
  of value 0 (a flat quarter of the picture) is no key: images alike only there are
  not matched (such bands would gather a large share of a web crawl).

A flat image (dhash 0, shared by every solid colour) is matched by its bytes only.
Hashes are written as ``sha256:HEX`` and ``dhash:HEX`` lines (`format_hashes`), the
format of ``--exclude`` files (data_pipelines/eval_hashes.py); ``--exclude`` matches
them exactly.
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


BANDS = 4  # 16-bit bands of the 64-bit dhash: the candidate keys of a near-duplicate lookup
MAX_NEAR_BITS = BANDS - 1  # the largest distance the banding finds every pair within


def hamming(a: str, b: str) -> int:
    """The number of bits two hex dhashes differ in."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def band_keys(dhash_hex: str) -> list[str]:
    """``"i:HHHH"`` for each non-zero 16-bit band ``i`` of a dhash (see the module docstring)."""
    value = int(dhash_hex, 16)
    bands = [(value >> (16 * (BANDS - 1 - i))) & 0xFFFF for i in range(BANDS)]
    return [f"{i}:{band:04x}" for i, band in enumerate(bands) if band]


def check_near_bits(near_bits: int) -> None:
    """Raises ValueError for a distance the banding cannot find every pair within."""
    if not 0 <= near_bits <= MAX_NEAR_BITS:
        raise ValueError(f"near_dup_bits={near_bits}: must be 0 (exact dhash) to {MAX_NEAR_BITS}")


class Seen:
    """The hashes a converter kept so far: exact ``kind:hex`` lines, and with ``near_bits`` > 0
    the dhashes by band (`band_keys`) for near-duplicate lookup."""

    def __init__(self, near_bits: int = 0):
        check_near_bits(near_bits)
        self.near_bits = near_bits
        self.lines: set[str] = set()
        self.by_band: dict[str, list[int]] = {}

    def exact(self, line: str) -> bool:
        return line in self.lines

    def near(self, dhash_hex: str) -> bool:
        """Whether a kept dhash is within ``near_bits`` of ``dhash_hex`` (equal when 0)."""
        if not self.near_bits:
            return f"dhash:{dhash_hex}" in self.lines
        value = int(dhash_hex, 16)
        return any(
            (value ^ other).bit_count() <= self.near_bits
            for key in band_keys(dhash_hex)
            for other in self.by_band.get(key, ())
        )

    def add(self, lines: list[str]) -> None:
        self.lines.update(lines)
        for line in lines:
            if line.startswith("dhash:") and self.near_bits:
                value = line.removeprefix("dhash:")
                for key in band_keys(value):
                    self.by_band.setdefault(key, []).append(int(value, 16))


def drop_reason(hashes: dict[str, str] | None, exclude: frozenset[str], seen: Seen | None) -> str | None:
    """Why a record with ``hashes`` is dropped, or None: ``eval_excluded`` (in ``exclude``),
    ``duplicate_exact`` (its sha256 in ``seen``), ``duplicate_near`` (its dhash, or one within
    ``seen.near_bits``, in ``seen``). Adds its hashes to ``seen`` (None: no dedup); the first
    copy seen survives."""
    if hashes is None:
        return None
    if exclude and excluded(hashes, exclude):
        return "eval_excluded"
    if seen is None:
        return None
    exact, *near = format_hashes(hashes)
    if seen.exact(exact):
        return "duplicate_exact"
    seen.add([exact])
    if near and seen.near(hashes["dhash"]):
        return "duplicate_near"
    seen.add(near)
    return None
