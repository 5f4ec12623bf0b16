"""Zero-shot classification and image search from the command line.

    python -m clip_jax.predict classify --model=RUN_OR_EXPORT photos/ cat.jpg --labels=cat,dog,car
    python -m clip_jax.predict index --model=M photos/ shards/*.array_record --out=index.npz
    python -m clip_jax.predict search --model=M --index=index.npz --text="a red car" --html=hits.html

``--model`` is anything `clip_jax.inference.load` reads. Inputs are image files,
folders (searched recursively) and ArrayRecord shards (``*.array_record``; their
records' captions can serve as labels and as ground truth: ``--labels_from_captions``).
Missing files and unreadable images are reported, skipped and counted in the summary.

argparse, not absl flags: three subcommands with different options.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import html
import io
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# A few of CLIP's ImageNet prompt templates (Radford et al. 2021, notebooks/Prompt_Engineering).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the small {}.",
    "a drawing of a {}.",
    "art of the {}.",
)


@dataclasses.dataclass(frozen=True)
class Item:
    """One image: a file path, or ``shard#index`` of an ArrayRecord record (with its caption)."""

    ref: str
    caption: str | None = None


def _progress(items, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit="img", file=sys.stderr, disable=None)


def gather(inputs: Sequence[str], skipped: collections.Counter) -> list[Item]:
    """Files, folders (recursive, by extension) and ArrayRecord shards -> items; missing inputs counted."""
    items = []
    for path in inputs:
        if path.endswith(".array_record") and os.path.isfile(path):
            from clip_jax.data import pipeline

            for i, record in enumerate(pipeline.read_all([path])):
                items.append(Item(f"{path}#{i}", record.get("caption")))
        elif os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                found = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
                items.extend(Item(os.path.join(root, n)) for n in found)
        elif os.path.isfile(path):
            items.append(Item(path))
        else:
            print(f"skipped {path}: no such file or folder", file=sys.stderr)
            skipped["missing"] += 1
    return items


def read_bytes(ref: str) -> bytes:
    """A file's bytes, or the image bytes of record ``shard#index``."""
    path, _, index = ref.rpartition("#")
    if path.endswith(".array_record") and index.isdigit():
        import grain

        from clip_jax.data import records

        return records.decode(grain.sources.ArrayRecordDataSource([path])[int(index)]).get("image") or b""
    with open(ref, "rb") as f:
        return f.read()


def embed_images(model, items: Sequence[Item], skipped: collections.Counter) -> tuple[np.ndarray, list[Item]]:
    """Unit image embeddings [N, E] of the readable items (the others reported and counted)."""
    from clip_jax.data.skips import BadRecord

    kept, pixels, chunks = [], [], []
    for item in _progress(items, "images"):
        try:
            pixels.append(model.preprocess(read_bytes(item.ref)))
        except (OSError, BadRecord) as e:
            reason = e.reason if isinstance(e, BadRecord) else type(e).__name__
            print(
                f"skipped {item.ref}: {e if isinstance(e, BadRecord) else f'{reason}: {e}'}", file=sys.stderr
            )
            skipped[reason] += 1
            continue
        kept.append(item)
        if len(pixels) == model.batch_size:
            chunks.append(model.encode_image(np.stack(pixels)))
            pixels = []
    if pixels:
        chunks.append(model.encode_image(np.stack(pixels)))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, model.config.embed_dim), np.float32)
    return emb, kept


def class_weights(model, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Prompt ensembling: per label, the renormalised mean of its prompts' unit embeddings [C, E]."""
    prompts = [t.format(label) for label in labels for t in templates]
    emb = model.encode_text(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def _read_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _labels(args, items: Sequence[Item]) -> list[str]:
    if args.labels_from_captions:
        return sorted({i.caption for i in items if i.caption})
    if args.labels_file:
        return _read_lines(args.labels_file)
    if args.labels:
        return [s.strip() for s in args.labels.split(",") if s.strip()]
    raise SystemExit("give --labels=a,b,c, --labels_file=FILE or --labels_from_captions")


def _summary(start: float, done: int, skipped: collections.Counter, what: str) -> str:
    skips = f"; skipped {sum(skipped.values())} ({dict(skipped)})" if skipped else "; skipped 0"
    return f"{what} {done} images in {time.perf_counter() - start:.1f}s{skips}"


def classify(args, model) -> dict:
    start, skipped = time.perf_counter(), collections.Counter()
    items = gather(args.inputs, skipped)
    labels = _labels(args, items)
    templates = (
        _read_lines(args.templates_file) if args.templates_file else (args.template or DEFAULT_TEMPLATES)
    )
    image_emb, kept = embed_images(model, items, skipped)
    probs = model.probabilities(image_emb, class_weights(model, labels, templates))
    order = np.argsort(-probs, axis=1)[:, : args.top_k]
    for item, row, p in zip(kept, order, probs, strict=True):
        if not args.summary_only:
            print(f"{item.ref}\t" + "\t".join(f"{labels[c]} ({p[c]:.1%})" for c in row))
    result = {"images": len(kept), "labels": len(labels), "skipped": dict(skipped)}
    truth = [labels.index(i.caption) if i.caption in labels else -1 for i in kept]
    if kept and all(t >= 0 for t in truth):  # every image's own caption is a label
        ranks = np.sum(probs > probs[np.arange(len(kept)), truth][:, None], axis=1)
        result.update({"top1": float(np.mean(ranks < 1)), "top5": float(np.mean(ranks < 5))})
        print(f"accuracy against captions: top-1 {result['top1']:.1%}, top-5 {result['top5']:.1%} "
              f"(chance {1 / len(labels):.1%}, {len(labels)} labels)")  # fmt: skip
    print(_summary(start, len(kept), skipped, "classified"), flush=True)
    return result


def index(args, model) -> dict:
    start, skipped = time.perf_counter(), collections.Counter()
    items = gather(args.inputs, skipped)
    emb, kept = embed_images(model, items, skipped)
    np.savez(
        args.out,
        embeddings=emb.astype(np.float32),
        refs=np.asarray([i.ref for i in kept], dtype=str),
        captions=np.asarray([i.caption or "" for i in kept], dtype=str),
        model=np.asarray(os.path.abspath(args.model)),
    )
    print(_summary(start, len(kept), skipped, f"indexed -> {args.out}:"), flush=True)
    return {"images": len(kept), "skipped": dict(skipped)}


def _thumbnail(ref: str, size: int = 128) -> str:
    """An inline ``data:`` URI of a PNG thumbnail (empty when unreadable)."""
    from clip_jax.inference import read_image

    try:
        img = read_image(read_bytes(ref))
    except Exception:  # the sheet still lists the hit
        return ""
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def contact_sheet(path: str, query: str, hits: Sequence[tuple[float, str, str]]) -> None:
    """An HTML page: the query, then each hit's thumbnail (inline), score, ref and caption."""
    cells = []
    for rank, (score, ref, caption) in enumerate(hits, 1):
        src = _thumbnail(ref)
        img = f'<img src="{src}">' if src else "<div>(unreadable)</div>"
        cells.append(
            f"<figure>{img}<figcaption>#{rank} {score:.3f}<br>{html.escape(caption)}"
            f"<br><small>{html.escape(ref)}</small></figcaption></figure>"
        )
    style = "figure{display:inline-block;width:150px;vertical-align:top;font:12px sans-serif}"
    with open(path, "w") as f:
        f.write(f"<!doctype html><meta charset=utf-8><title>{html.escape(query)}</title>"
                f"<style>{style}</style><h3>{html.escape(query)}</h3>{''.join(cells)}\n")  # fmt: skip


def search(args, model) -> dict:
    data = np.load(args.index)
    emb, refs, captions = data["embeddings"], data["refs"], data["captions"]
    if args.text:
        query, q = f"text: {args.text}", model.encode_text([args.text])[0]
    else:
        query, q = f"image: {args.image}", model.encode_image([args.image])[0]
    if q.shape[-1] != emb.shape[-1]:
        raise SystemExit(f"{args.index}: embeddings of width {emb.shape[-1]}, the model's are {q.shape[-1]}")
    scores = emb @ q
    top = np.argsort(-scores)[: args.top_k]
    hits = [(float(scores[i]), str(refs[i]), str(captions[i])) for i in top]
    print(query)
    for rank, (score, ref, caption) in enumerate(hits, 1):
        print(f"{rank:3d}  {score:.3f}  {ref}  {caption}")
    if args.html:
        contact_sheet(args.html, query, hits)
        print(f"contact sheet -> {args.html}")
    return {"hits": hits}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clip_jax.predict", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="workdir, params export, HF or OpenAI weights")
    common.add_argument(
        "--tokenizer", help="sentencepiece .model or CLIP vocab.json, if not beside the weights"
    )
    common.add_argument("--batch_size", type=int, default=64)
    common.add_argument("--weights_overrides", help="heads/activation a bare state dict lacks (as export)")
    c = commands.add_parser("classify", parents=[common], help="zero-shot top-k per image")
    c.add_argument("inputs", nargs="+", help="image files, folders, *.array_record shards")
    c.add_argument("--labels", help="comma-separated class names")
    c.add_argument("--labels_file", help="one class name per line")
    c.add_argument("--labels_from_captions", action="store_true", help="the records' captions (and truth)")
    c.add_argument("--template", action="append", help="prompt with {} for the label (repeat; '{}': as is)")
    c.add_argument("--templates_file", help="one template per line")
    c.add_argument("--top_k", type=int, default=5)
    c.add_argument("--summary_only", action="store_true")
    i = commands.add_parser("index", parents=[common], help="embed images into an .npz index")
    i.add_argument("inputs", nargs="+")
    i.add_argument("--out", required=True)
    s = commands.add_parser("search", parents=[common], help="top matches of a text or an image")
    s.add_argument("--index", required=True)
    query = s.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image")
    s.add_argument("--top_k", type=int, default=10)
    s.add_argument("--html", help="write a contact sheet of the hits here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    from clip_jax import inference

    model = inference.load(
        args.model, tokenizer=args.tokenizer, batch_size=args.batch_size, overrides=args.weights_overrides
    )
    return {"classify": classify, "index": index, "search": search}[args.command](args, model)


if __name__ == "__main__":
    main()
