"""An HTML report of a training run: ``python -m clip_jax.report WORKDIR``.

Writes ``WORKDIR/report/index.html`` and PNGs (for a ``gs://`` workdir, into a
local cache directory, printed: a report is for a browser): training curves from
``metrics.jsonl`` (loss, in-batch accuracies, logit scale, learning rate,
throughput), evaluation results over steps from ``eval/*.json`` with their
chance levels, confusion matrices of small label sets, per-template prompt
accuracies, and (for the synthetic-scenes demo, from the latest checkpoint) a
retrieval gallery: the top images of a few captions, the top captions of a few images.
"""

from __future__ import annotations

import html
import json
import os
import re

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clip_jax import cli, outputs, storage  # noqa: E402
from clip_jax.data import bounded  # noqa: E402

MAX_EVAL_BYTES = 16 * 2**20  # an eval/*.json larger than this is no clip_jax result: refused, not read

CURVES = (
    ("loss", ("loss",)),
    ("in-batch accuracy", ("i2t_acc", "t2i_acc")),
    ("logit scale", ("logit_scale",)),
    ("learning rate", ("lr",)),
    ("throughput (pairs/s)", ("pairs_per_sec",)),
    ("gradient norm", ("grad_norm",)),
)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in bounded.lines(path) if line.strip()]  # streamed, lines capped


def read_evals(workdir: str) -> dict[str, list[tuple[int, dict]]]:
    """eval/STEP[_TASK_DATASET].json -> {"" or "TASK_DATASET": [(step, results), ...] by step}.

    The training loop's eval/STEP.json holds {evaluator: metrics}: one group per evaluator
    (a run from before evaluators wrote the metrics themselves: group "")."""
    out: dict[str, list] = {}
    for path in storage.glob(os.path.join(workdir, "eval", "*.json")):
        match = re.fullmatch(r"(\d+)_?(.*)\.json", os.path.basename(path))
        if match:
            if (size := storage.size(path)) > MAX_EVAL_BYTES:  # results of a run are kilobytes
                raise storage.BadFileError(f"{path}: {size} bytes, over {MAX_EVAL_BYTES}; not eval results")
            results, step = storage.read_json(path), int(match.group(1))
            if not match.group(2) and _by_evaluator(results):  # the loop's {evaluator: metrics}
                for name, metrics in results.items():
                    out.setdefault(name, []).append((step, metrics))
            else:
                out.setdefault(match.group(2), []).append((step, results))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in sorted(out.items())}


def _by_evaluator(results) -> bool:
    return isinstance(results, dict) and bool(results) and all(isinstance(v, dict) for v in results.values())


def _scalars(results: dict) -> dict[str, float]:
    return {k: v for k, v in results.items() if isinstance(v, int | float) and k != "step"}


def plot_training(rows: list[dict], path: str) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    steps = [r["step"] for r in rows]
    for ax, (title, keys) in zip(axes.flat, CURVES, strict=True):
        for key in keys:
            ys = [r.get(key) for r in rows]
            # The first throughput point includes compilation.
            xs, ys = (steps[1:], ys[1:]) if key == "pairs_per_sec" and len(rows) > 1 else (steps, ys)
            ax.plot(xs, ys, label=key, marker="." if len(rows) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curve_names(results: dict) -> list[str]:
    """The metrics an evaluator's over-steps plot draws: its scalars, not chance levels,
    majority rates or counts (``n_images``), at most 12."""
    skip = ("_chance", "_majority")
    return [k for k in _scalars(results) if not k.endswith(skip) and not k.startswith("n_")][:12]


def plot_eval_steps(history: list[tuple[int, dict]], path: str) -> None:
    """Metrics (not chance levels) over evaluation steps; chance as dashed lines."""
    names = curve_names(history[-1][1])
    fig, ax = plt.subplots(figsize=(9, 5))
    steps = [s for s, _ in history]
    for name in names:
        (line,) = ax.plot(steps, [r.get(name, np.nan) for _, r in history], marker="o", label=name)
        if f"{name}_chance" in history[-1][1]:
            ax.axhline(history[-1][1][f"{name}_chance"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("evaluation over steps (dashed: chance)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusion(matrix, labels, title: str, path: str) -> None:
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(matrix), 0.8 + 0.5 * len(matrix)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(
            j, i, str(v), ha="center", va="center", fontsize=8, color="k" if v < matrix.max() / 2 else "w"
        )
    ticks = range(len(matrix))
    ax.set_xticks(ticks, labels or ticks, rotation=45, ha="right")
    ax.set_yticks(ticks, labels or ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_prompts(report: dict, title: str, path: str) -> None:
    templates = list(report["per_template"])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(templates) + 1.2))
    ax.barh(templates, [report["per_template"][t] for t in templates], color="tab:blue")
    ax.axvline(report["ensemble"], color="tab:green", label=f"ensemble {report['ensemble']:.1%}")
    ax.axvline(report["chance"], color="grey", ls="--", label=f"chance {report['chance']:.1%}")
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def class_names_for(key: str):
    from clip_jax.data import scenes

    if key.startswith("zero_shot_shape"):
        return list(scenes.SHAPES)
    if key.startswith("zero_shot_colour"):
        return list(scenes.COLOURS)
    return None


def scenes_gallery(workdir: str, path: str, queries: int = 4, top: int = 4) -> bool:
    """Top images for a few held-out captions and top captions for a few held-out images."""
    from clip_jax import recipe
    from clip_jax import workdir as workdir_files
    from clip_jax.data import pipeline
    from clip_jax.eval import retrieval
    from clip_jax.eval.encode import Encoder

    run = workdir_files.load(workdir)
    model, params, tokenizer, step = run.model, run.params, run.tokenizer, run.step
    data = recipe.resolve_data(run.config, workdir).scenes
    if data is None:
        return False
    gallery = pipeline.load_eval_set([data.heldout_scenes], tokenizer, model.config.vision.image_size)
    encoder = Encoder(model, params, 128)
    sim = encoder.texts(gallery["tokens"]) @ encoder.images(gallery["image"]).T  # [T, N]
    text_top, image_top = retrieval.top_matches(sim, top), retrieval.top_matches(sim.T, 3)
    fig = plt.figure(figsize=(2.2 * top, 2.6 * 2 * queries))
    grid = fig.add_gridspec(2 * queries, top, hspace=0.7, wspace=0.15)
    for q in range(queries):  # text -> images: the caption above its top images
        for j, idx in enumerate(text_top[q]):
            ax = fig.add_subplot(grid[q, j])
            ax.imshow(gallery["image"][idx])
            ax.set_xlabel(f"#{j + 1}" + (" (true image)" if idx == q else ""), fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_title(f"query: {gallery['caption'][q]}", loc="left", fontsize=9)
    for q in range(queries):  # image -> captions
        image = queries + q
        ax = fig.add_subplot(grid[queries + q, 0])
        ax.imshow(gallery["image"][image])
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title("image query", loc="left", fontsize=9)
        ax = fig.add_subplot(grid[queries + q, 1:])
        ax.axis("off")
        lines = [
            f"{j + 1}. {gallery['caption'][c]}" + ("   <- true caption" if c == image else "")
            for j, c in enumerate(image_top[image])
        ]
        lines.append(f"(true: {gallery['caption'][image]})")
        ax.text(0, 0.5, "\n".join(lines), fontsize=9, va="center")
    fig.suptitle(f"retrieval among {len(sim)} held-out scenes, step {step}", fontsize=11)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def _number(value, fmt: str = ".3f") -> str:
    """A number as ``fmt``; anything else (a workdir is untrusted input) escaped as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return html.escape(str(value))


class _Names:
    """PNG file names derived from workdir content (eval groups, result keys): only
    ``[A-Za-z0-9_.-]``, no leading dot, bounded length, unique, and inside ``out``."""

    def __init__(self, out: str):
        self.out, self.used = os.path.realpath(out), set()

    def __call__(self, *parts: str) -> tuple[str, str]:
        """(file name, its path under ``out``)."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(str(p) for p in parts)).lstrip(".-")[:80] or "plot"
        name, n = f"{stem}.png", 1
        while name in self.used:
            n += 1
            name = f"{stem}_{n}.png"
        self.used.add(name)
        path = os.path.join(self.out, name)
        if os.path.dirname(os.path.realpath(path)) != self.out:  # no separator survives; kept as a guard
            raise ValueError(f"report: derived file name {name!r} leaves {self.out}")
        return name, path


def _img(name: str) -> str:
    return f"<img src='{html.escape(name)}'>"


def _table(results: dict) -> str:
    rows = []
    for name, value in _scalars(results).items():
        if name.endswith("_chance"):
            continue
        chance = results.get(f"{name}_chance")
        chance_text = _number(chance) if isinstance(chance, int | float) else ""
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_number(value)}</td><td>{chance_text}</td></tr>")
    return "<table><tr><th>metric</th><th>value</th><th>chance</th></tr>" + "".join(rows) + "</table>"


def build(workdir: str) -> str:
    """Writes the report (WORKDIR/report, replaced whole once complete); returns the path of index.html."""
    out = storage.local_dir(workdir, "report")
    with outputs.staged_dir(out) as staged:
        _write_report(workdir, staged)
    return os.path.join(out, "index.html")


def _write_report(workdir: str, out: str) -> None:
    """The report's files, written into the directory ``out``."""
    parts = [f"<h1>clip_jax run: {html.escape(storage.absolute(workdir))}</h1>"]
    names = _Names(out)
    names("training"), names("gallery")  # reserved: a crafted group or key cannot take them
    rows = [r for r in read_metrics(workdir) if "loss" in r]  # not a row of evaluation results alone
    if rows:
        plot_training(rows, os.path.join(out, "training.png"))
        last = rows[-1]
        parts.append(
            f"<h2>Training</h2><p>{len(rows)} log lines, last step {_number(last.get('step'), 'd')}, "
            f"loss {_number(last.get('loss'), '.4f')}</p><img src='training.png'>"
        )
    for group, history in read_evals(workdir).items():
        label = group or "end-of-training evaluation"
        step, results = history[-1]
        parts.append(f"<h2>Evaluation: {html.escape(label)} (step {step})</h2>{_table(results)}")
        slug = group or "eval"
        if len(history) > 1:
            name, path = names(slug, "steps")
            plot_eval_steps(history, path)
            parts.append(_img(name))
        for key, matrix in results.items():
            if key.endswith("confusion"):
                name, path = names(slug, key)
                plot_confusion(matrix, class_names_for(key), f"{key} (step {step})", path)
                parts.append(_img(name))
        for attribute, report in results.get("prompt_sensitivity", {}).items():
            name, path = names(slug, "prompts", attribute)
            plot_prompts(report, f"zero-shot {attribute}: accuracy per prompt template", path)
            parts.append(_img(name))
    if storage.glob(os.path.join(workdir, "checkpoints", "*")):
        try:
            if scenes_gallery(workdir, os.path.join(out, "gallery.png")):
                parts.append("<h2>Retrieval gallery</h2><img src='gallery.png'>")
        except Exception as e:  # the report still builds without the gallery
            parts.append(f"<p>no gallery: {html.escape(type(e).__name__)}: {html.escape(str(e)[:200])}</p>")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%;display:block;margin:1em 0}"
    )
    head = f"<meta charset='utf-8'><title>clip_jax report</title><style>{style}</style>"
    page = f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(page)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise cli.UserError("give the workdir: python -m clip_jax.report WORKDIR")
    if not storage.isdir(argv[1]):
        raise cli.UserError(f"{argv[1]}: no such folder (give a training run's workdir)")
    print(f"wrote {build(argv[1])}")


if __name__ == "__main__":
    cli.run(main)
