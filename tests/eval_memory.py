"""Peak host memory of streamed zero-shot evaluation: 2,000 vs 20,000 generated images.

    PYTHONPATH=. python tests/eval_memory.py [--sizes 2000,20000] [--image_size 64] [--inmemory]

Writes ``ROOT/CLASS/*.jpg`` folders of generated images (CIFAR-10's class names), then evaluates each
in a fresh process (8 CPU devices, the tiny model at ``image_size``) and prints that
process's peak RSS (``ru_maxrss``). Streaming keeps only a few integers per image, so the
peaks should differ by little; ``--inmemory`` also runs the old in-memory path
(`clip_jax.eval.sources.image_folder`), whose peak grows with the images held.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import eval_stream_setup as setup
import jax
import numpy as np
from PIL import Image

from clip_jax import sharding, zeroshot_metadata
from clip_jax.eval import classify, sources, zeroshot
from clip_jax.eval.encode import Encoder
from clip_jax.models import clip, shapes

CLASSES = 10


def generate(root: str, n: int, size: int) -> None:
    rng = np.random.default_rng(n)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(n):
        folder = os.path.join(root, zeroshot_metadata.CIFAR10_CLASSNAMES[i % CLASSES].replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        pixels = (ramp[None, :, None] * 0.5 + colour[None, None, :] * 0.5).repeat(size, 0).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())


def child(root: str, size: int, mode: str) -> None:
    config = shapes.with_overrides(
        clip.get_variant("tiny", vocab_size=setup.VOCAB, context_length=setup.CONTEXT),
        vision={"image_size": size, "patch_size": size // 4, "width": 32, "layers": 1, "heads": 2},
        text_tower={"width": 32, "layers": 1, "heads": 2},
        embed_dim=32,
    )
    model = clip.CLIP(config)
    variables = model.init(jax.random.key(0), *clip.dummy_inputs(config))
    variables = jax.tree.map(
        lambda x: getattr(x, "value", x), variables, is_leaf=lambda x: hasattr(x, "value")
    )
    mesh = sharding.make_mesh({"data": -1})
    start = time.monotonic()
    if mode == "stream":
        ctx = setup.context(model, variables, mesh, batch_size=256)
        result = classify.ZeroShotEvaluator("zs", f"folder:{root}", size)(ctx)
    else:
        data = sources.image_folder(root, size)
        encoder = Encoder(model, variables, 256)
        weights = zeroshot.classifier_weights(
            encoder, setup.ByteTokenizer(), zeroshot.prompt_sets(data["class_names"], ["a photo of a {}."])
        )
        result = zeroshot.classification_metrics(encoder.images(data["image"]) @ weights.T, data["label"])
        result["n_images"] = len(data["label"])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "mode": mode,
                "n_images": result["n_images"],
                "top1": result["top1"],
                "peak_rss_mib": round(peak_mib, 1),
                "seconds": round(time.monotonic() - start, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--inmemory", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "MODE"))
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.image_size, args.child[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), here, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            root = os.path.join(tmp, str(n))
            generate(root, n, args.image_size)
            for mode in ("stream", "inmemory") if args.inmemory else ("stream",):
                cmd = [sys.executable, __file__, "--image_size", str(args.image_size), "--child", root, mode]
                subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
