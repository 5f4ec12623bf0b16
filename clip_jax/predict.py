"""Zero-shot classification and image search from the command line.

    python -m clip_jax.predict classify --model=RUN_OR_EXPORT photos/ cat.jpg --labels=cat,dog,car
    python -m clip_jax.predict index --model=M photos/ shards/*.array_record --out=index.npz
    python -m clip_jax.predict search --model=M --index=index.npz --text="a red car" --html=hits.html

The first argument is the command (classify, index, search); absl flags may come
before or after the inputs.

``--model`` is anything `clip_jax.inference.load` reads. Inputs are image files,
folders (searched recursively) and ArrayRecord shards (``*.array_record``; their
records' captions can serve as labels and as ground truth: ``--labels_from_captions``).
Missing files, unreadable images and corrupt records are reported, skipped and counted in
the summary. Scores that are not finite (a model with NaN weights) are an error, not a ranking.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import html
import io
import os
import sys
import tempfile
import time
import types
from collections.abc import Sequence

import numpy as np
from absl import flags

from clip_jax import cli, storage
from clip_jax.data import bounded, records

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
            for i, record in records.read_shard(path, skipped):
                caption = record.get("caption")
                items.append(Item(f"{path}#{i}", caption if isinstance(caption, str) else None))
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
        image = records.decode(records.open_shard(path)[int(index)]).get("image")
        return image if isinstance(image, bytes) else b""
    return bounded.read_file(ref)  # regular files of bounded size only: never /dev/zero, a FIFO


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


def _read_lines(path: str, flag: str) -> list[str]:
    """The non-empty lines of the text file given as ``--flag``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise cli.UserError(
            f"--{flag}={path}: {getattr(e, 'strerror', None) or e} (a UTF-8 text file)"
        ) from None
    if not lines:
        raise cli.UserError(f"--{flag}={path} is empty: one entry a line")
    return lines


def _labels(args, items: Sequence[Item]) -> list[str]:
    if args.labels_from_captions:
        labels = sorted({i.caption for i in items if i.caption})
        if not labels:
            raise cli.UserError("--labels_from_captions: the inputs have no captions (give --labels)")
        return labels
    if args.labels_file:
        return _read_lines(args.labels_file, "labels_file")
    labels = [s.strip() for s in (args.labels or "").split(",") if s.strip()]
    if not labels:
        raise cli.UserError("give --labels=a,b,c, --labels_file=FILE or --labels_from_captions")
    return labels


def check_finite(emb: np.ndarray, what: str) -> None:
    """Non-finite embeddings would rank as anything at all: an error naming where they come from."""
    bad = int(np.sum(~np.all(np.isfinite(emb), axis=-1))) if emb.size else 0
    if bad:
        raise cli.UserError(f"{what}: {bad} of {len(emb)} embeddings are not finite (NaN or inf weights?)")


def _summary(start: float, done: int, skipped: collections.Counter, what: str) -> str:
    skips = f"; skipped {sum(skipped.values())} ({dict(skipped)})" if skipped else "; skipped 0"
    return f"{what} {done} images in {time.perf_counter() - start:.1f}s{skips}"


def classify(args, model) -> dict:
    start, skipped = time.perf_counter(), collections.Counter()
    items = gather(args.inputs, skipped)
    labels = _labels(args, items)
    templates = (
        _read_lines(args.templates_file, "templates_file")
        if args.templates_file
        else (args.template or DEFAULT_TEMPLATES)
    )
    if any("{}" not in t for t in templates):
        raise cli.UserError("--template/--templates_file: each template needs {} where the label goes")
    image_emb, kept = embed_images(model, items, skipped)
    weights = class_weights(model, labels, templates)
    check_finite(image_emb, f"--model={args.model} (images)")
    check_finite(weights, f"--model={args.model} (labels)")
    probs = model.probabilities(image_emb, weights)
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


def _output_path(out: str, inputs: Sequence[str], items: Sequence[Item], model: str) -> str:
    """``--out`` checked before anything is computed: an .npz file that is none of the inputs."""
    if not out.endswith(".npz"):
        raise cli.UserError(f"--out={out}: name the index FILE.npz")
    if os.path.isdir(out):
        raise cli.UserError(f"--out={out} is a folder; name the index FILE.npz")
    read = {os.path.realpath(p) for p in (*inputs, model)}
    read |= {os.path.realpath(i.ref.rpartition("#")[0] if "#" in i.ref else i.ref) for i in items}
    if os.path.realpath(out) in read:
        raise cli.UserError(f"--out={out} is one of the inputs; choose another file name")
    return out


def index(args, model) -> dict:
    start, skipped = time.perf_counter(), collections.Counter()
    items = gather(args.inputs, skipped)
    out = _output_path(args.out, args.inputs, items, args.model)
    emb, kept = embed_images(model, items, skipped)
    check_finite(emb, f"--model={args.model} (images)")
    # A temporary name in the same folder, then a rename: a reader never sees half an index.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=os.path.dirname(out) or "."
    )
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                embeddings=emb.astype(np.float32),
                refs=np.asarray([i.ref for i in kept], dtype=str),
                captions=np.asarray([i.caption or "" for i in kept], dtype=str),
                model=np.asarray(os.path.abspath(args.model)),
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(_summary(start, len(kept), skipped, f"indexed -> {out}:"), flush=True)
    return {"images": len(kept), "skipped": dict(skipped)}


def load_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings [N, E], refs [N], captions [N]) of an index `index` wrote; no pickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            emb, refs, captions = data["embeddings"], data["refs"], data["captions"]
    except FileNotFoundError:
        raise cli.UserError(f"--index={path}: no such file (make one with the index command)") from None
    except (OSError, ValueError, KeyError, EOFError) as e:  # not an .npz, a pickle, a field missing
        raise cli.UserError(f"--index={path} is not an index made by the index command ({e})") from None
    if emb.ndim != 2 or len(refs) != len(emb) or len(captions) != len(emb):
        raise cli.UserError(f"--index={path}: embeddings, refs and captions do not match in length")
    check_finite(emb, f"--index={path}")
    return emb, refs, captions


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
    emb, refs, captions = load_index(args.index)
    if bool(args.text) == bool(args.image):
        raise cli.UserError("give one of --text and --image")
    if args.text:
        query, q = f"text: {args.text}", model.encode_text([args.text])[0]
    else:
        if not os.path.isfile(args.image):
            raise cli.UserError(f"--image={args.image}: no such file")
        query, q = f"image: {args.image}", model.encode_image([args.image])[0]
    check_finite(q[None], f"--model={args.model} (query)")
    if q.shape[-1] != emb.shape[-1]:
        raise cli.UserError(
            f"--index={args.index}: embeddings of width {emb.shape[-1]}, the model's are {q.shape[-1]}"
        )
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


COMMANDS = {"classify": classify, "index": index, "search": search}


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags on ``fv`` (absl's FLAGS when run as a program; see `run`)."""

    def string(name, help_, default=None):
        flags.DEFINE_string(name, default, help_, flag_values=fv)

    flags.DEFINE_string(
        "model", None, "Workdir, params export, HF or OpenAI weights.", required=True, flag_values=fv
    )
    string("tokenizer", "Sentencepiece .model or CLIP vocab.json, if not beside the weights.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", lower_bound=1, flag_values=fv)
    string("labels", "classify: comma-separated class names.")
    string("labels_file", "classify: one class name per line.")
    flags.DEFINE_bool(
        "labels_from_captions", False, "classify: the records' captions (and truth).", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "template", None, "classify: prompt with {} for the label (repeat).", flag_values=fv
    )
    string("templates_file", "classify: one template per line.")
    flags.DEFINE_integer(
        "top_k", None, "Labels (classify, 5) or hits (search, 10) shown.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_bool("summary_only", False, "classify: only the summary lines.", flag_values=fv)
    string("out", "index: the .npz file to write.")
    string("index", "search: an .npz the index command wrote.")
    string("text", "search: a text query.")
    string("image", "search: an image file as the query.")
    string("html", "search: write a contact sheet of the hits here.")
    string("weights_overrides", "Heads/activation a bare state dict lacks (as export's flag).")


def _arguments(argv: Sequence[str], fv: flags.FlagValues) -> types.SimpleNamespace:
    """The command and its inputs from what absl left (``[program, command, *inputs]``), checked."""
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = f" (got {argv[1]!r})" if len(argv) > 1 else ""
        raise cli.UserError(f"the first argument is the command: {', '.join(COMMANDS)}{got}")
    args = types.SimpleNamespace(command=argv[1], inputs=list(argv[2:]), **fv.flag_values_dict())
    needs = {"classify": (), "index": ("out",), "search": ("index",)}[args.command]
    for name in needs:
        if not getattr(args, name):
            raise cli.UserError(f"{args.command} needs --{name}")
    if args.command != "search" and not args.inputs:
        raise cli.UserError(
            f"{args.command}: give image files, folders or *.array_record shards after the flags"
        )
    if args.command == "search" and args.inputs:
        raise cli.UserError(f"search takes no inputs (got {args.inputs[:3]}); the query is --text or --image")
    args.top_k = args.top_k or (10 if args.command == "search" else 5)
    if not storage.exists(args.model):
        raise cli.UserError(f"--model={args.model}: no such file or folder")
    return args


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> dict:
    """``argv``: what absl left after the flags, ``[program, command, *inputs]``."""
    args = _arguments(argv, fv)
    from clip_jax import inference  # jax and the model code: not for --help or a flag mistake

    model = inference.load(
        args.model, tokenizer=args.tokenizer, batch_size=args.batch_size, overrides=args.weights_overrides
    )
    return COMMANDS[args.command](args, model)


def run(args: Sequence[str]) -> dict:
    """``main`` on a command line of its own (without the program name): for tests and notebooks."""
    fv = flags.FlagValues()
    define_flags(fv)
    return main(fv(["predict", *args]), fv)


def program(argv: Sequence[str]) -> None:
    """`main` as a program: its result is printed already, the exit code is 0."""
    main(argv)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    cli.run(program)
