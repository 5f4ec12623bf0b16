"""Shared setup of the streamed-evaluator tests: a tiny model, a tokenizer, eval sets written to disk.

Also the worker of the multi-process test: ``python tests/eval_stream_setup.py DATA OUT.json
[COORDINATOR NUM_PROCESSES PROCESS_ID]`` runs the three evaluators on the sets in DATA and
writes their metrics (process 0).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np

IMAGE_SIZE, CONTEXT, VOCAB = 16, 16, 256


class ByteTokenizer:
    """Texts -> int32 [N, CONTEXT]: UTF-8 bytes + 1, zero-padded (a stand-in for SentencePiece)."""

    vocab_size = VOCAB

    def __call__(self, texts):
        out = np.zeros((len(texts), CONTEXT), np.int32)
        for i, text in enumerate(texts):
            ids = [min(b, 254) + 1 for b in text.encode()][:CONTEXT]
            out[i, : len(ids)] = ids
        return out


def tiny_model():
    """A 16-pixel, one-block CLIP and its variables (fixed seed)."""
    import jax

    from clip_jax.models import clip, shapes

    config = shapes.with_overrides(
        clip.get_variant("tiny", vocab_size=VOCAB, context_length=CONTEXT),
        vision={"image_size": IMAGE_SIZE, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        text_tower={"width": 32, "layers": 1, "heads": 2},
        embed_dim=32,
    )
    model = clip.CLIP(config)
    variables = model.init(jax.random.key(0), *clip.dummy_inputs(config))
    unbox = lambda x: getattr(x, "value", x)
    return model, jax.tree.map(unbox, variables, is_leaf=lambda x: hasattr(x, "value"))


def context(model, variables, mesh, batch_size=8, train_batch_size=8, loss="softmax"):
    from clip_jax import losses, sharding
    from clip_jax.eval import stream
    from clip_jax.eval.evaluator import EvalContext

    del sharding
    return EvalContext(
        model=model,
        variables=stream.replicate(variables, mesh),
        tokenizer=ByteTokenizer(),
        mesh=mesh,
        batch_size=batch_size,
        train_batch_size=train_batch_size,
        loss_fn=losses.make_loss(loss, mesh),
        step=0,
    )


def image_bytes(rng, fmt="PNG", size=(20, 14)) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


CLASSES = ("ant", "bee", "blue_jay", "cat", "dog", "owl", "red_fox")  # folder names, sorted
TEMPLATES_C = ("a photo of a {c}.", "art of the {c}.")


def write_folder(root: str, counts, seed=0) -> list[tuple[bytes, int]]:
    """ROOT/CLASS/NNN.png with counts[c] random images of class c -> (bytes, label) in folder order."""
    rng = np.random.default_rng(seed)
    out = []
    for label, count in enumerate(counts):
        os.makedirs(os.path.join(root, CLASSES[label]), exist_ok=True)
        for i in range(count):
            data = image_bytes(rng)
            with open(os.path.join(root, CLASSES[label], f"{i:03d}.png"), "wb") as f:
                f.write(data)
            out.append((data, label))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(directory: str, samples, class_names=None, templates=None, per_shard=5, ext="png") -> None:
    """CLIP_benchmark's layout: DIR/test/{0..n-1}.tar (+ nshards.txt), classnames.txt, templates.
    samples: (image bytes, label int | list of captions)."""
    os.makedirs(os.path.join(directory, "test"), exist_ok=True)
    shards = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    index = 0
    for n, shard in enumerate(shards):
        with tarfile.open(os.path.join(directory, "test", f"{n}.tar"), "w") as tar:
            for data, target in shard:
                key = f"s{index:07d}"
                _add(tar, f"{key}.{ext}", data)
                if isinstance(target, list):
                    _add(tar, f"{key}.txt", "\n".join(target).encode())
                else:
                    _add(tar, f"{key}.cls", str(target).encode())
                index += 1
    with open(os.path.join(directory, "test", "nshards.txt"), "w") as f:
        f.write(f"{len(shards)}\n")
    if class_names:
        with open(os.path.join(directory, "classnames.txt"), "w") as f:
            f.write("\n".join(class_names) + "\n")
    if templates:
        with open(os.path.join(directory, "zeroshot_classification_templates.txt"), "w") as f:
            f.write("\n".join(templates) + "\n")


def caption_records(n: int, seed: int = 1) -> list[dict]:
    """n image records with 1..3 captions each (some a list, some one ``caption``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        texts = [f"image {i} caption {j} {rng.integers(1000)}" for j in range(1 + i % 3)]
        record = {"key": f"k{i}", "image": image_bytes(rng)}
        record.update({"caption": texts[0]} if len(texts) == 1 else {"captions": texts})
        out.append(record)
    return out


def write_sets(data: str) -> None:
    """The sets the multi-process test evaluates: a folder, wds retrieval and ArrayRecord pairs."""
    from clip_jax.data import records

    write_folder(os.path.join(data, "folder"), (5, 3, 4, 2, 3, 1, 2))
    recs = caption_records(13)
    write_wds(
        os.path.join(data, "wds_ret"), [(r["image"], r.get("captions") or [r["caption"]]) for r in recs]
    )
    records.write_shards(caption_records(21, seed=2), os.path.join(data, "pairs"), 2)


def run_evaluators(data: str, mesh) -> dict:
    from clip_jax.eval import classify, retrieve, val_loss

    model, variables = tiny_model()
    ctx = context(model, variables, mesh)
    evaluators = [
        classify.ZeroShotEvaluator("zs", f"folder:{os.path.join(data, 'folder')}", IMAGE_SIZE),
        retrieve.RetrievalEvaluator("ret", f"wds:{os.path.join(data, 'wds_ret')}", IMAGE_SIZE),
        val_loss.ValLossEvaluator("val", f"array_record:{os.path.join(data, 'pairs')}*", IMAGE_SIZE),
    ]
    return {e.name: e(ctx) for e in evaluators}


def worker(data: str, out: str, coordinator=None, num_processes=1, process_id=0) -> None:
    import jax

    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    from clip_jax import sharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    results = run_evaluators(data, mesh)
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    args = sys.argv[1:]
    worker(args[0], args[1], *(args[2:3]), *(int(a) for a in args[3:5]))
