"""``config.eval.evaluators`` -> the `Evaluator` objects the loop and ``python -m clip_jax.evaluate``
run (one table, `KINDS`: adding an evaluator kind touches its module and one line here).

    c.eval.evaluators = ConfigDict({
        "scenes": {"kind": "scenes", "every": 100, "diagnostics": True, "probes": 200},
    })

Each named section has a ``kind``, a cadence ``every`` (steps; 0: only at the end) and
the kind's options. A config written before evaluators existed (``eval.every``,
``eval.diagnostics``, ``eval.probes``, ``eval.linear_probe`` and no ``evaluators``)
gets the scene evaluation it ran then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import ml_collections

from clip_jax import cli
from clip_jax.data import scenes
from clip_jax.eval import classify, retrieve, scenes_suite, val_loss
from clip_jax.eval.evaluator import Evaluator


class EvaluatorConfigError(cli.UserError, ValueError):
    """A ``config.eval.evaluators`` section that cannot work; the message names it."""


def _scenes(name: str, every: int, options: dict, scenes_dataset, image_size: int) -> Evaluator:
    del image_size  # the scenes carry their own
    if scenes_dataset is None:
        raise EvaluatorConfigError(
            f"config.eval.evaluators.{name}: kind 'scenes' needs the demo's scenes (config.data.scenes)"
        )
    return scenes_suite.ScenesEvaluator(name, every, scenes_dataset, **options)


def _with(cls):
    """A builder for an evaluator class with ``from_config(name, section, image_size)``."""

    def build(name: str, every: int, options: dict, scenes_dataset, image_size: int) -> Evaluator:
        del scenes_dataset
        return cls.from_config(name, {**options, "every": every}, image_size)

    return build


_SET = {"dataset": None, "limit": None}  # every eval-set kind: where the set lies, and a cap
# kind -> (builder, {option: default}); a section's other keys are refused.
KINDS: dict[str, tuple[Callable[..., Evaluator], dict[str, Any]]] = {
    "scenes": (_scenes, {"diagnostics": True, "probes": 200, "linear_probe": False}),
    "zeroshot": (
        _with(classify.ZeroShotEvaluator),
        {**_SET, "templates": None, "class_names": None, "label_key": None, "tfds_data_dir": None},
    ),
    "retrieval": (_with(retrieve.RetrievalEvaluator), {**_SET, "ks": (1, 5, 10)}),
    "val_loss": (_with(val_loss.ValLossEvaluator), dict(_SET)),
}
_LEGACY = ("every", "diagnostics", "probes", "linear_probe")  # config.eval before evaluators


def sections(eval_config: ml_collections.ConfigDict, has_scenes: bool = True) -> dict[str, dict]:
    """{name: {"kind", "every", **options}} of ``config.eval``, checked (EvaluatorConfigError):
    known kinds, unique names, ``every`` >= 0, no unknown options, scenes only with
    ``has_scenes``. Options left out take
    their kind's defaults."""
    evaluators = eval_config.get("evaluators")
    if evaluators is None:  # a config from before evaluators: the demo's scene evaluation
        if not has_scenes:
            return {}
        legacy = {k: eval_config.get(k) for k in _LEGACY if eval_config.get(k) is not None}
        evaluators = {"scenes": {"kind": "scenes", **legacy}}
    if isinstance(evaluators, list | tuple):  # [{"name": ..., "kind": ...}, ...]
        named: dict[str, Any] = {}
        for section in evaluators:
            section = dict(section)
            name = section.pop("name", None)
            if name in named:
                raise EvaluatorConfigError(f"config.eval.evaluators: the name {name!r} is used twice")
            named[name] = section
        evaluators = named
    out = {}
    for name, section in dict(evaluators).items():
        section = _plain(section)
        where = f"config.eval.evaluators.{name}"
        if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
            raise EvaluatorConfigError(f"{where}: name evaluators with letters, digits and '_'")
        if not isinstance(section, dict):
            raise EvaluatorConfigError(f"{where}: a section with 'kind' and 'every', not {section!r}")
        kind = section.get("kind")
        if kind not in KINDS:
            raise EvaluatorConfigError(f"{where}.kind={kind!r} is unknown; known: {sorted(KINDS)}")
        if kind == "scenes" and not has_scenes:
            raise EvaluatorConfigError(f"{where}: kind 'scenes' needs the demo's scenes (config.data.scenes)")
        every = section.get("every", 0)
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise EvaluatorConfigError(f"{where}.every={every!r}: steps between runs (0: only at the end)")
        defaults = KINDS[kind][1]
        unknown = sorted(set(section) - {"kind", "every", *defaults})
        if unknown:
            raise EvaluatorConfigError(
                f"{where}: unknown options {unknown}; kind {kind!r} takes {sorted(defaults)}"
            )
        if "dataset" in defaults and not section.get("dataset"):
            raise EvaluatorConfigError(
                f"{where}.dataset is not set: folder:ROOT, wds:DIR (CLIP_benchmark's layout), "
                "array_record:GLOB or tfds:NAME[:SPLIT]"
            )
        out[name] = {**defaults, **section, "kind": kind, "every": every}
    return out


def _plain(value):
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def options_hash(section: dict) -> str:
    """A short hash of what an evaluator computes (its kind and options; not its cadence)."""
    options = {k: v for k, v in section.items() if k != "every"}
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]


def build(
    eval_config: ml_collections.ConfigDict,
    *,
    scenes_dataset: scenes.ScenesDataset | None,
    image_size: int,
) -> list[Evaluator]:
    """The evaluators of ``config.eval`` (see the module docstring), in the config's order."""
    out = []
    for name, section in sections(eval_config, scenes_dataset is not None).items():
        builder, defaults = KINDS[section["kind"]]
        options = {k: section[k] for k in defaults}
        out.append(builder(name, section["every"], options, scenes_dataset, image_size))
    return out
