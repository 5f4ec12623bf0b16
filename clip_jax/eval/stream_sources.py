"""Evaluation sets as random-access lists of examples: a cheap length, one row read on demand.

Every source is a sequence whose ``source[i]`` reads (and only reads) row ``i``::

    {"key": str, "image": bytes | None, "label": int | None, "captions": list[str] | None}

so a process of a multi-host run reads only the rows of its share of each global
batch (`clip_jax.eval.stream`). A row that cannot be read raises `skips.BadRecord`
(the stream masks it out and counts it). Sources:

- `FolderSource`: ``ROOT/CLASS/*.jpg`` (classes in sorted folder order, as
  torchvision's ImageFolder and `clip_jax.eval.sources.image_folder`);
- `RecordSource`: ArrayRecord shards (clip_jax records: ``label`` or
  ``labels[label_key]``, ``caption`` / ``captions``);
- `TfdsSource`: a TFDS split prepared as array_record (`clip_jax.data.tfds_source`);
- `WdsSource`: CLIP_benchmark's webdataset layout: ``DIR/test/{0..n-1}.tar`` (or every
  ``*.tar`` there, in natural order) of ``KEY.webp|png|jpg`` with ``KEY.cls`` (an int) or
  ``KEY.txt`` (one caption per line), ``DIR/classnames.txt`` and
  ``DIR/zeroshot_classification_templates.txt`` (``{c}`` marks the class name). Tar
  members are found by an index of the tar headers (no member data is read to build it)
  and read by offset, at most `bounded.MAX_MEMBER_BYTES` each.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tarfile
from typing import Any

import grain

from clip_jax import cli
from clip_jax.data import bounded, captions, records, skips, tfds_source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference
MAX_TEXT_FILE_BYTES = 16 * 2**20  # classnames.txt / templates / nshards.txt of a downloaded set


class EvalSetError(cli.UserError):
    """An evaluation set that cannot be read as named (no classes, no shards, wrong layout)."""


def read_lines(path: str) -> list[str]:
    """The non-blank lines of a small text file (bounded read), stripped."""
    try:
        data = bounded.read_bytes(path, MAX_TEXT_FILE_BYTES)
    except skips.BadRecord as e:
        raise EvalSetError(f"{path}: cannot be read ({e.reason})") from None
    return [line.strip() for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]


def _label(record: dict, label_key: str | None) -> int | None:
    value = record.get("label") if label_key is None else (record.get("labels") or {}).get(label_key)
    return None if value is None else int(value)


def _captions(record: dict) -> list[str] | None:
    try:
        return captions.all_texts(record)
    except skips.BadRecord:
        return None


class FolderSource:
    """``ROOT/CLASS/*.jpg``; ``limit_per_class`` files of each class (sorted by name)."""

    def __init__(self, root: str, limit_per_class: int | None = None):
        if not os.path.isdir(root):
            raise EvalSetError(f"{root}: not a folder of class folders")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise EvalSetError(f"{root}: no class folders")
        self.root = root
        self.class_names = [c.replace("_", " ") for c in classes]
        self._files: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            files = sorted(
                f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            self._files += [(os.path.join(name, f), label) for f in files[:limit_per_class]]

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, label = self._files[i]
        image = bounded.read_file(bounded.resolve(self.root, name))
        return {"key": name, "image": image, "label": label, "captions": None}


class RecordSource:
    """ArrayRecord shards (a glob, or comma-separated globs) of clip_jax records."""

    def __init__(self, pattern: str, label_key: str | None = None, field: str = "dataset"):
        files = records.expand(pattern, field)
        try:
            self._source = grain.sources.ArrayRecordDataSource(files)
        except (RuntimeError, OSError) as e:
            raise records.ShardError(
                f"{pattern}: not ArrayRecord shards ({str(e).splitlines()[0][:120]})"
            ) from None
        self.pattern, self.label_key, self.class_names = pattern, label_key, None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            record = records.decode(self._source[i])
        except Exception:  # corrupt msgpack raises any of several exception types
            record = None
        if not isinstance(record, dict):
            raise skips.BadRecord("decode_error", f"{self.pattern}[{i}]")
        return {
            "key": str(record.get("key", i)),
            "image": record.get("image"),
            "label": _label(record, self.label_key),
            "captions": _captions(record),
        }


class TfdsSource:
    """A TFDS split prepared as array_record; class names from its ``label`` ClassLabel."""

    def __init__(self, name: str, split: str = "test", data_dir: str | None = None):
        spec = tfds_source.TfdsSpec(name=name, split=split, data_dir=data_dir, caption_key=None)
        try:
            source = tfds_source.open_source(spec)
        except tfds_source.TfdsError as e:
            raise EvalSetError(str(e)) from None
        names = tfds_source.class_names(source, spec)
        self.class_names = [n.replace("_", " ") for n in names] if names else None
        self._records = tfds_source.records(spec)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self._records[i]
        if record.get("bad"):
            raise skips.BadRecord(record["bad"], record["key"])
        return {
            "key": record["key"],
            "image": record["image"],
            "label": record.get("label"),
            "captions": None,
        }


@dataclasses.dataclass(frozen=True)
class _Member:
    offset: int
    size: int


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def wds_shards(directory: str, split: str = "test") -> list[str]:
    """``DIR/SPLIT/{0..n-1}.tar`` as ``nshards.txt`` names them, else every ``*.tar`` in natural order."""
    folder = os.path.join(directory, split)
    if not os.path.isdir(folder):
        raise EvalSetError(
            f"{directory}: no {split}/ folder of .tar shards (CLIP_benchmark's webdataset layout)"
        )
    count_file = os.path.join(folder, "nshards.txt")
    if os.path.exists(count_file):
        lines = read_lines(count_file)
        if len(lines) != 1 or not lines[0].isdigit():
            raise EvalSetError(f"{count_file}: not one shard count")
        shards = [os.path.join(folder, f"{i}.tar") for i in range(int(lines[0]))]
    else:
        shards = sorted(
            (os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar")), key=_natural
        )
    missing = [s for s in shards if not os.path.isfile(s)]
    if not shards or missing:
        raise EvalSetError(
            f"{folder}: {'missing shards ' + ', '.join(missing[:3]) if missing else 'no .tar shards'}"
        )
    return shards


def index_tar(path: str, max_member_bytes: int = bounded.MAX_MEMBER_BYTES) -> list[tuple[str, dict]]:
    """[(key, {ext: _Member | "too_large"})] of a plain tar, in member order, from its headers only."""
    with open(path, "rb") as f:
        if kind := bounded.compression(f.read(512)):
            raise bounded.BadShard(f"{path}: a {kind}-compressed shard; decompress it to a plain .tar")
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:  # headers only: the data is skipped by seeking
                if not info.isfile():
                    continue
                directory, base = os.path.split(info.name)
                stem, _, ext = base.partition(".")
                key = os.path.join(directory, stem)
                member = (
                    _Member(info.offset_data, info.size) if info.size <= max_member_bytes else "too_large"
                )
                samples.setdefault(key, {})[ext.lower()] = member
    except (tarfile.TarError, EOFError, OSError) as e:
        raise bounded.BadShard(f"{path}: not a readable tar file ({e})") from None
    return list(samples.items())


class WdsSource:
    """CLIP_benchmark's webdataset layout (see the module docstring), random access by a header index."""

    def __init__(self, directory: str, split: str = "test"):
        self.directory = directory
        self._shards = wds_shards(directory, split)
        self._index: list[tuple[int, str, dict]] = []
        for n, shard in enumerate(self._shards):
            self._index += [(n, key, members) for key, members in index_tar(shard)]
        if not self._index:
            raise EvalSetError(f"{directory}/{split}: the shards hold no samples")
        names = os.path.join(directory, "classnames.txt")
        self.class_names = read_lines(names) if os.path.exists(names) else None
        templates = os.path.join(directory, "zeroshot_classification_templates.txt")
        self.templates = read_lines(templates) if os.path.exists(templates) else None

    def __len__(self) -> int:
        return len(self._index)

    def _read(self, shard: int, member) -> bytes:
        if member == "too_large":
            raise skips.BadRecord("too_large", self._shards[shard])
        with open(self._shards[shard], "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
        if len(data) != member.size:
            raise skips.BadRecord("truncated", self._shards[shard])
        return data

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, key, members = self._index[i]
        ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            raise skips.BadRecord("missing_image", f"{self._shards[shard]}: {key}")
        label = texts = None
        if "cls" in members:
            raw = self._read(shard, members["cls"]).decode("utf-8", errors="replace").strip()
            if not re.fullmatch(r"-?\d+", raw):
                raise skips.BadRecord("decode_error", f"{self._shards[shard]}: {key}.cls is not an integer")
            label = int(raw)
        if "txt" in members:
            lines = self._read(shard, members["txt"]).decode("utf-8", errors="replace").splitlines()
            texts = [t.strip() for t in lines if t.strip()][: captions.MAX_CAPTIONS] or None
        return {"key": key, "image": self._read(shard, members[ext]), "label": label, "captions": texts}


def parse_tfds(spec: str) -> tuple[str, str]:
    """``NAME[:VERSION][:SPLIT]`` -> (name with version, split; default "test")."""
    parts = spec.split(":")
    if len(parts) > 1 and not re.fullmatch(r"[\d.]+", parts[-1]):
        return ":".join(parts[:-1]), parts[-1]
    return spec, "test"


KINDS = ("folder", "wds", "array_record", "tfds")


def open_dataset(
    spec: str,
    label_key: str | None = None,
    limit_per_class: int | None = None,
    tfds_data_dir: str | None = None,
):
    """``folder:ROOT``, ``wds:DIR``, ``array_record:GLOB`` or ``tfds:NAME[:split]`` -> a source
    (``tfds_data_dir``: None reads $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    kind, _, value = spec.partition(":")
    if kind not in KINDS or not value:
        raise EvalSetError(f"dataset={spec!r}: expected one of {', '.join(k + ':...' for k in KINDS)}")
    if kind == "folder":
        return FolderSource(value, limit_per_class)
    if kind == "wds":
        return WdsSource(value)
    if kind == "array_record":
        return RecordSource(value, label_key, f"dataset=array_record:{value}")
    return TfdsSource(*parse_tfds(value), data_dir=tfds_data_dir)
