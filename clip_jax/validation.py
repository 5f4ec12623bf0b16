"""Config checks that run before anything is built or compiled.

Every error names the config field and says what to do.
"""

from __future__ import annotations

import functools
import re

import ml_collections
from jax.sharding import Mesh

from clip_jax import cli, losses, sharding, storage
from clip_jax.data import mixture, pipeline, records
from clip_jax.eval import suite
from clip_jax.interop import overrides
from clip_jax.models import layers, shapes


class ConfigError(cli.UserError, ValueError):
    """A config value that cannot work; the message names the field."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks that need no devices: names, ranges, required paths."""
    try:
        m = config.model
        shape = shapes.from_sections(m.variant, m.get("vision"), m.get("text"), m.get("embed_dim"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    canvas_size, image_size = config.data.get("canvas_size", 0), shape.vision.image_size
    _require(
        canvas_size == 0 or canvas_size >= image_size,
        f"config.data.canvas_size={canvas_size} must be 0 (crops resized on the host) or at least "
        f"the model's image size {image_size}",
    )
    _require(
        config.train.loss in losses.BUILDERS,
        f"config.train.loss={config.train.loss!r} is unknown; known: {sorted(losses.BUILDERS)}",
    )
    for field, minimum in (
        ("train.batch_size", 1),
        ("train.total_steps", 1),
        ("train.log_every", 1),
        ("optim.warmup_steps", 0),
        ("eval.batch_size", 1),
        ("train.accum_steps", 1),
        ("train.max_nonfinite_steps", 1),
    ):
        section, name = field.split(".")
        value = config[section][name]
        _require(value >= minimum, f"config.{field}={value} must be >= {minimum}")
    try:  # the evaluators' kinds, names, cadences and options
        suite.sections(config.eval, has_scenes=bool(config.data.get("scenes")))
    except suite.EvaluatorConfigError as e:
        raise ConfigError(str(e)) from None
    _require(config.optim.lr > 0, f"config.optim.lr={config.optim.lr} must be > 0")
    _require(
        config.model.dtype in ("float32", "bfloat16"),
        f"config.model.dtype={config.model.dtype!r}: use 'float32' or 'bfloat16'",
    )
    _require(
        config.model.remat in ("none", *layers.REMAT_POLICIES),
        f"config.model.remat={config.model.remat!r}: use one of {['none', *layers.REMAT_POLICIES]}",
    )
    _require(
        0.0 <= config.model.patch_dropout < 1.0,
        f"config.model.patch_dropout={config.model.patch_dropout} must be in [0, 1)",
    )
    check_data(config.data)
    check_finetune(config)


def check_finetune(config: ml_collections.ConfigDict) -> None:
    """``optim.freeze`` / ``optim.lr_multipliers`` regexes and factors, ``train.init_from``."""
    freeze = config.optim.get("freeze") or ()
    _require(
        not isinstance(freeze, str),
        f"config.optim.freeze={freeze!r} must be a tuple of regexes, e.g. ('^visual/',)",
    )
    multipliers = dict(config.optim.get("lr_multipliers") or {})
    for field, pattern in [("freeze", p) for p in freeze] + [("lr_multipliers", p) for p in multipliers]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.optim.{field}: {pattern!r} is not a regex ({e})") from None
    for pattern, factor in multipliers.items():
        _require(
            isinstance(factor, int | float) and factor >= 0,
            f"config.optim.lr_multipliers[{pattern!r}]={factor!r} must be a number >= 0",
        )
    init_from = config.train.get("init_from")
    _require(
        not init_from or storage.exists(init_from),
        f"config.train.init_from={init_from!r} does not exist (a clip_jax workdir, a params "
        "export, an HF directory or an OpenAI/open_clip state dict)",
    )
    try:
        overrides.parse(config.train.get("init_from_overrides"))
    except overrides.OverridesError as e:
        raise ConfigError(f"config.train.init_from_overrides: {e}") from None


def _check_range(field: str, value, low: float, high: float) -> None:
    """A (min, max) pair with low < min <= max <= high."""
    ok = len(value) == 2 and low < value[0] <= value[1] <= high
    _require(ok, f"config.data.{field}={tuple(value)} must be (min, max) with {low} < min <= max <= {high}")


def check_data(data: ml_collections.ConfigDict) -> None:
    """``config.data``: the reader, the augmentation, the skip ceiling and the required paths."""
    _require(
        data.format in pipeline.FORMATS,
        f"config.data.format={data.format!r} is unknown; use one of {list(pipeline.FORMATS)}",
    )
    _require(
        0.0 <= data.max_skip_fraction < 1.0,
        f"config.data.max_skip_fraction={data.max_skip_fraction} must be in [0, 1)",
    )
    _require(
        data.get("max_member_bytes", 1) > 0,
        f"config.data.max_member_bytes={data.get('max_member_bytes')} must be positive (bytes per member)",
    )
    _check_range("crop_scale", data.crop_scale, 0.0, 1.0)
    _check_range("crop_ratio", data.crop_ratio, 0.0, float("inf"))
    if data.get("scenes") or data.get("emoji"):  # generated into the workdir by recipe.resolve_data
        return
    if data.get("sources"):
        _require(
            not data.train_files,
            "config.data.sources and config.data.train_files are both set: give the files in "
            "config.data.sources.NAME.files only",
        )
        for name, source in data.sources.items():
            _check_source(name, source)
    elif data.format == "tfds":
        _require(
            bool(data.tfds_name),
            "config.data.tfds_name is required with config.data.format='tfds': pass "
            "--config.data.tfds_name=NAME[:VERSION] (a dataset prepared in array_record format)",
        )
        _require(
            bool(data.caption_key) or (bool(data.label_key) and "{}" in data.caption_template),
            "config.data.caption_key is required unless config.data.label_key is set and "
            f"config.data.caption_template={data.caption_template!r} has a '{{}}' for the class name",
        )
    else:
        _require(
            bool(data.train_files),
            "config.data.train_files is required: pass "
            "--config.data.train_files='/data/train-*.array_record' "
            "(ArrayRecord shards on local disk or a gcsfuse mount)",
        )
    _require(
        bool(data.tokenizer),
        "config.data.tokenizer is required: pass --config.data.tokenizer=PATH.model "
        "(a sentencepiece model; data_pipelines/train_tokenizer.py makes one)",
    )


# The fields a mixture source may have (config.data.sources.NAME.*): ArrayRecord files, or a
# TFDS split with the fields config.data has for format "tfds" (tfds_name, tfds_split, ...).
SOURCE_FIELDS = ("files", "weight", "format", "caption_field")
TFDS_SOURCE_FIELDS = (
    "tfds_name",
    "tfds_split",
    "tfds_data_dir",
    "image_key",
    "caption_key",
    "label_key",
    "caption_template",
)
SOURCE_FORMATS = ("array_record", "tfds")  # random access: the position is global (data/elastic.py)


def _check_source(name: str, source) -> None:
    """``config.data.sources.NAME``: known fields, files (or a TFDS name) given, a positive finite weight."""
    field = f"config.data.sources.{name}"
    _require(
        isinstance(source, ml_collections.ConfigDict),
        f"{field} must be a dict with {list(SOURCE_FIELDS)}, not {source!r}",
    )
    fmt = source.get("format", "array_record")
    known = ("weight", "format", *TFDS_SOURCE_FIELDS) if fmt == "tfds" else SOURCE_FIELDS
    unknown = sorted(set(source.keys()) - set(known))
    _require(
        not unknown, f"{field}: unknown field(s) {unknown}; a source of format {fmt!r} has {list(known)}"
    )
    if fmt == "tfds":
        _require(bool(source.get("tfds_name")), f"{field}.tfds_name is required with format 'tfds'")
        caption_key, label_key = source.get("caption_key"), source.get("label_key", "label")
        template = source.get("caption_template") or "a photo of a {}."
        _require(
            bool(caption_key) or (bool(label_key) and "{}" in template),
            f"{field}.caption_key is required unless its label_key names a ClassLabel and its "
            f"caption_template={template!r} has a '{{}}' for the class name",
        )
    else:
        _require(bool(source.get("files")), f"{field}.files is required (glob(s) of ArrayRecord shards)")
    weight = source.get("weight", 1.0)
    _require(
        isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight < float("inf"),
        f"{field}.weight={weight!r} must be a number > 0",
    )
    _require(
        fmt in SOURCE_FORMATS,
        f"{field}.format={fmt!r}: a mixture source must be one of {list(SOURCE_FORMATS)} "
        "(streamed tar shards have no global position; convert them with data_pipelines/)",
    )


def data_sources(config: ml_collections.ConfigDict) -> list[mixture.Source]:
    """``config.data.sources`` resolved (files globbed), sorted by name; [] for a single source.

    Raises `ConfigError` naming the source's field when its files match nothing, are in an
    object store, or its weight is too small to be drawn.
    """
    data = config.data
    if not data.get("sources"):
        return []
    out = []
    for name in sorted(data.sources.keys()):
        source = data.sources[name]
        _check_source(name, source)
        if source.get("format") == "tfds":
            out.append(_tfds_source(name, source))
            continue
        field = f"config.data.sources.{name}.files"
        try:
            files = records.expand(source.files, field)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        remote = [f for f in files if storage.is_remote(f)]
        _require(not remote, f"{field}: {remote[0] if remote else ''} is in an object store: mount it")
        fmt, caption_field = source.get("format", "array_record"), source.get("caption_field")
        out.append(mixture.Source(name, tuple(files), float(source.get("weight", 1.0)), fmt, caption_field))
    total = sum(s.weight for s in out)
    for s in out:
        _require(
            s.weight / total * mixture.BLOCK >= 1,
            f"config.data.sources.{s.name}.weight={s.weight} is below 1/{mixture.BLOCK} of the total "
            f"({total}): it would never be drawn",
        )
    return out


def _tfds_source(name: str, source) -> mixture.Source:
    """A TFDS mixture source: its split's records (read without TensorFlow) and files (for the
    fingerprint); raises `ConfigError` naming the source's field when the prepared data does not fit."""
    from clip_jax.data import tfds_source  # tensorflow_datasets only when asked for

    spec = tfds_source.TfdsSpec.from_source(name, source)
    try:
        files = tfds_source.split_files(spec)
    except tfds_source.TfdsError as e:
        raise ConfigError(str(e)) from None
    weight = float(source.get("weight", 1.0))
    return mixture.Source(
        name, tuple(files), weight, "tfds", records=functools.partial(tfds_source.records, spec)
    )


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split evenly over the batch-sharded devices and the processes."""
    ways = sharding.batch_devices(mesh)
    batch = config.train.batch_size
    _require(batch >= 1, f"config.train.batch_size={batch} must be >= 1")
    _require(
        batch % ways == 0,
        f"config.train.batch_size={batch} is not divisible by the batch-sharded devices "
        f"(data x fsdp = {ways} on mesh {dict(mesh.shape)})",
    )
    accum = config.train.accum_steps
    _require(
        batch % (ways * accum) == 0,
        f"config.train.batch_size={batch} must split into config.train.accum_steps={accum} "
        f"micro-batches over data x fsdp = {ways} devices (a multiple of {ways * accum})",
    )
    processes = len({d.process_index for d in mesh.devices.flat})
    _require(
        batch % processes == 0,
        f"config.train.batch_size={batch} is not divisible by the process count {processes}",
    )


def data_files(config: ml_collections.ConfigDict) -> list[str]:
    """The training files, with an error naming config.data.train_files when none match.

    Format "tfds": the array_record files of the split, with an error naming
    config.data.tfds_name (or the feature key) when the prepared data does not fit.
    """
    if config.data.format == "tfds":
        from clip_jax.data import tfds_source  # tensorflow_datasets only when asked for

        try:
            return tfds_source.split_files(tfds_source.TfdsSpec.from_config(config.data))
        except tfds_source.TfdsError as e:
            raise ConfigError(str(e)) from None
    try:
        files = records.expand(config.data.train_files, "config.data.train_files")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    remote = [f for f in files if storage.is_remote(f)]
    _require(
        not remote or config.data.format == "webdataset",
        f"config.data.train_files: {remote[0] if remote else ''} is in an object store, and "
        f"data.format={config.data.format!r} reads local files only (ArrayRecord needs random "
        "access to local files): mount the bucket with gcsfuse and give the mounted path, or "
        "stream tar shards with data.format='webdataset'",
    )
    return files
