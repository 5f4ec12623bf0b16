"""Hashes of an evaluation set's images, for ``--exclude`` (decontamination of training shards).

Sources: an image folder (every image file under it), ArrayRecord shards of
`clip_jax.data.records`, or webdataset tars; every read bounded
(`clip_jax.data.bounded`), every decode guarded (`transforms.decode_image`). Each
image gives two lines, ``sha256:HEX`` (its bytes) and ``dhash:HEX`` (its pixels,
`clip_jax.data.dedup`); an unreadable one is counted and skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grain

from clip_jax import storage
from clip_jax.data import bounded, convert_readers, dedup, records, skips, transforms, webdataset


def _folder(root: str) -> Iterator[tuple[str, bytes | skips.BadRecord]]:
    for parent, dirs, names in os.walk(root):  # symlinked folders are not entered
        dirs.sort()
        for name in sorted(names):
            if name.rsplit(".", 1)[-1].lower() in webdataset.IMAGE_EXTENSIONS:
                path = os.path.join(parent, name)
                try:
                    yield path, bounded.read_file(bounded.resolve(root, os.path.relpath(path, root)))
                except skips.BadRecord as e:  # a FIFO, a link out of the folder: counted, not fatal
                    yield path, e


def _array_records(path: str) -> Iterator[tuple[str, bytes]]:
    source = grain.sources.ArrayRecordDataSource([path])
    for i in range(len(source)):  # one record at a time: an eval set need not fit in memory
        record = records.decode(source[i])
        yield f"{path}#{record.get('key', i)}", record.get("image") or b""


def _tar(path: str) -> Iterator[tuple[str, bytes | skips.BadRecord]]:
    for item in convert_readers.TarReader(path)():
        yield item.key, skips.BadRecord(item.bad, item.detail or "") if item.bad else item.image or b""


def images(path: str) -> Iterator[tuple[str, bytes | skips.BadRecord]]:
    """(name, encoded bytes, or why they cannot be read) of every image of ``path``: a folder,
    ``.array_record`` or ``.tar``."""
    if not storage.is_remote(path) and os.path.isdir(path):
        return _folder(path)
    if path.endswith(".array_record"):
        return _array_records(path)
    if path.endswith(".tar"):
        return _tar(path)
    raise ValueError(f"{path}: expected an image folder, .array_record or .tar")


def collect(paths: list[str]) -> tuple[list[str], dict[str, int]]:
    """The sorted, distinct hash lines of every image of ``paths``; counts {"images", "skipped/REASON"}."""
    lines, counts = set(), {"images": 0}
    for path in paths:
        for _, data in images(path):
            try:
                if isinstance(data, skips.BadRecord):
                    raise data
                img = transforms.decode_image(data)
            except skips.BadRecord as e:
                counts[f"skipped/{e.reason}"] = counts.get(f"skipped/{e.reason}", 0) + 1
                continue
            lines.update(dedup.format_hashes(dedup.image_hashes(data, img)))
            counts["images"] += 1
    return sorted(lines), counts
