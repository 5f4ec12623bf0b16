"""Exports weights: ``python -m clip_jax.export --workdir=DIR --format=hf --out=OUT``.

Reads a training run (``DIR/config.json`` and the orbax checkpoints under
``DIR/checkpoints``; the latest step unless ``--step``; DIR and OUT may be local
or ``gs://`` paths) and writes one of:

- ``hf``: a transformers ``CLIPModel`` directory (``CLIPModel.from_pretrained(OUT)``);
- ``open_clip``: OpenAI/open_clip state-dict names, as safetensors;
- ``params``: clip_jax's own parameter paths + ``clip_config.json``, for inference;
- ``big_vision``: ``big_vision.npz`` for big_vision's two_towers (SigLIP towers; ``--scan``
  for its scanned layout).

``--weights=PATH`` instead of ``--workdir`` converts existing weights (an HF
directory, a ``params`` export, an OpenAI/open_clip ``.safetensors``/``.pt``).
See `clip_jax.interop` for the layouts.
"""

from __future__ import annotations

import os
from typing import Any

from absl import flags, logging

from clip_jax import cli, outputs, storage, workdir
from clip_jax.interop import files, overrides

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when run as a program (importing defines none)."""
    flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).")
    flags.DEFINE_string("weights", None, "Instead of --workdir: existing weights to convert.")
    flags.DEFINE_string("weights_overrides", None, overrides.FLAG_HELP)
    flags.DEFINE_bool(
        "trust_weights_code",
        False,
        "Let a TorchScript --weights archive run its own code on load (only for files whose author you "
        "trust); without it, only tensors are read and an archive that needs its code is refused.",
    )
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.DEFINE_enum("format", "hf", files.FORMATS, "Output layout.")
    flags.DEFINE_bool("scan", False, "--format=big_vision: one stacked encoderblock per tower (scan=True).")
    flags.DEFINE_string("out", None, "Output directory (written under a temporary name, then renamed).")
    flags.DEFINE_bool("overwrite", False, "Replace --out when it exists and is not empty.")
    flags.mark_flags_as_required(["out"])


def from_workdir(workdir_path: str, step: int | None = None) -> dict[str, Any]:
    """A run's weights: {"config": CLIPConfig, "params", "step", "tokenizer", "eos_id", "bos_id"}."""
    run = workdir.load(workdir_path, step)
    return {
        "config": run.model.config,
        "params": run.params,
        "step": run.step,
        "input": workdir_path,
        "tokenizer": run.tokenizer_path,
        "eos_id": run.tokenizer.eos_id,
        "bos_id": run.tokenizer.bos_id,
    }


def from_weights(path: str, weights_overrides: Any = None, allow_code: bool = False) -> dict[str, Any]:
    """Existing weights (any format `files.load` reads, with its ``overrides`` and ``allow_code``), with
    the special ids they record; an OpenAI/open_clip state dict records none: OpenAI's BPE has EOS =
    vocab - 1."""
    config, params = files.load(path, weights_overrides, allow_code=allow_code)
    eos_id, bos_id = files.special_ids(path) or (config.text.vocab_size - 1, config.text.vocab_size - 2)
    return {
        "config": config,
        "params": params,
        "step": None,
        "input": path,
        "eos_id": eos_id,
        "bos_id": bos_id,
    }


def _progress(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter
        return lambda items: _counter(list(items), desc)
    return lambda items: tqdm(list(items), desc=desc, unit="tensor")


def _counter(items: list, desc: str):
    for i, item in enumerate(items, 1):
        if i == len(items) or i % 50 == 0:
            print(f"{desc}: {i}/{len(items)}", flush=True)
        yield item


def export(
    source: dict[str, Any], fmt: str, out: str, overwrite: bool = False, scan: bool = False
) -> dict[str, Any]:
    """Writes ``source`` (`from_workdir`, `from_weights`) as ``fmt`` under ``out``; returns a summary.

    Refuses (cli.UserError) an ``out`` that overlaps the source, or exists and is not empty
    unless ``overwrite``. A local ``out`` is written under a temporary name, then renamed.
    ``scan``: big_vision's stacked-block layout.
    """
    outputs.check_target(out, [source.get("input", "")], overwrite)
    with outputs.staged_dir(out) as staged:
        path, tensors = files.save(
            staged,
            source["params"],
            source["config"],
            fmt,
            eos_id=source["eos_id"],
            bos_id=source["bos_id"],
            progress=_progress(f"converting to {fmt}"),
            scan=scan,
        )
        if fmt == "params" and source.get("tokenizer"):  # inference needs the run's tokenizer too
            storage.copy_file(source["tokenizer"], os.path.join(staged, workdir.TOKENIZER_FILE))
        size = storage.size(path)
    return {
        "format": fmt,
        "step": source["step"],
        "tensors": len(tensors),
        "params": int(sum(t.size for t in tensors.values())),
        "bytes": size,
        "path": os.path.join(out, os.path.basename(path)),
    }


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.workdir is None) == (FLAGS.weights is None):
        raise cli.UserError("give exactly one of --workdir and --weights")
    logging.set_verbosity(logging.WARNING)  # orbax narrates every file at INFO
    if FLAGS.workdir and FLAGS.weights_overrides:
        raise cli.UserError("--weights_overrides is for --weights (a run records its config)")
    outputs.check_target(FLAGS.out, [FLAGS.workdir or FLAGS.weights], FLAGS.overwrite)  # before reading
    if FLAGS.workdir:
        source = from_workdir(FLAGS.workdir, FLAGS.step)
    else:
        source = from_weights(
            FLAGS.weights, overrides.parse(FLAGS.weights_overrides), allow_code=FLAGS.trust_weights_code
        )
    summary = export(source, FLAGS.format, FLAGS.out, FLAGS.overwrite, FLAGS.scan)
    step = "" if summary["step"] is None else f" (step {summary['step']})"
    print(
        f"exported {summary['format']}{step}: {summary['tensors']} tensors, "
        f"{summary['params']:,} parameters, {summary['bytes'] / 2**20:.1f} MiB -> {summary['path']}",
        flush=True,
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
