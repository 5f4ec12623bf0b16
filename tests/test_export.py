"""Weights in and out: parity with transformers' CLIPModel and a torch OpenAI/open_clip
reference on random models of several shapes, exact round trips, and the export CLI
on a tiny training run. Run with ``-s`` to see the parity figures."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import scan_layout
from conftest import load_config
from safetensors.numpy import load_file

from clip_jax import export, train
from clip_jax.data import scenes
from clip_jax.interop import files, hf, mapping, openai
from clip_jax.models.clip import CLIP, CLIPConfig
from clip_jax.models.text import TextConfig
from clip_jax.models.vit import VisionConfig

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Widths, heads (head dims 8 to 48), depths, patch and image sizes, MLP ratios and both activations.
SHAPES = {
    "v64h4p8i32-t48h3-quickgelu": CLIPConfig(
        32, VisionConfig(32, 8, 64, 2, 4), TextConfig(100, 12, 48, 2, 3)
    ),
    "v96h2p14i28-t64h8-gelu": CLIPConfig(
        48,
        VisionConfig(28, 14, 96, 1, 2, mlp_ratio=2.0, activation="gelu"),
        TextConfig(300, 16, 64, 3, 8, activation="gelu"),
    ),
    "v32h1p4i16-t32h2-mixed": CLIPConfig(
        24,
        VisionConfig(16, 4, 32, 3, 1, activation="gelu"),
        TextConfig(64, 8, 32, 1, 2, mlp_ratio=3.0),
    ),
}
TOL = 1e-4  # float32, max abs diff of unit-norm embeddings


def random_params(config: CLIPConfig, seed: int = 0) -> dict:
    """Params of ``config``'s shapes, every tensor random (LayerNorm gains near 1, the rest
    N(0, 0.1^2)), so that a swapped or transposed tensor changes the outputs.
    Drawn with numpy: compiling ``model.init`` costs seconds per shape on a busy CPU."""
    shapes = jax.eval_shape(lambda: CLIP(config).init(jax.random.key(0), *dummy(config))["params"])
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in mapping.flatten(
        jax.tree.map(lambda x: np.zeros(x.shape), nn.meta.unbox(shapes))
    ).items():
        noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        flat[path] = 1 + noise if "/ln_" in path and path.endswith("/scale") else noise
    flat["logit_scale"] = np.float32(np.log(1 / 0.07))
    return mapping.unflatten(flat)


def dummy(config: CLIPConfig):
    s, length = config.vision.image_size, config.text.context_length
    return np.zeros((1, s, s, 3), np.float32), np.zeros((1, length), np.int32)


def make_inputs(config: CLIPConfig, eos_id: int, bos_id: int, seed: int = 0):
    """Images [4, S, S, 3] and token rows [BOS, ids..., EOS, 0...] of lengths 2, 5, L-3 and L."""
    rng = np.random.default_rng(seed)
    s, length = config.vision.image_size, config.text.context_length
    images = rng.standard_normal((4, s, s, 3)).astype(np.float32)
    tokens = np.zeros((4, length), np.int32)
    for row, n in zip(tokens, (2, 5, length - 3, length), strict=True):
        middle = rng.integers(1, config.text.vocab_size, n - 2)
        middle[np.isin(middle, (eos_id, bos_id))] = 1  # BOS/EOS only at the ends
        row[:n] = [bos_id, *middle, eos_id]
    return images, tokens


def clip_jax_outputs(config: CLIPConfig, params, images, tokens):
    """(image_emb [B, E], text_emb [B, E], logits [B, B]) from clip_jax."""
    model = CLIP(config)
    encode = jax.jit(
        lambda p, i, t: (
            model.apply({"params": p}, i, method=CLIP.encode_image),
            model.apply({"params": p}, t, method=CLIP.encode_text),
        )
    )  # one compilation: eager Flax compiles every small op
    image_emb, text_emb = (np.asarray(x) for x in encode(params, images, tokens))
    logits = np.exp(np.asarray(params["logit_scale"])) * image_emb @ text_emb.T
    return image_emb, text_emb, logits


def hf_outputs(model, images, tokens):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
        )
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def max_diffs(ours, theirs) -> tuple[float, float, float]:
    return tuple(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


def assert_parity(name: str, direction: str, ours, theirs, logit_scale: float):
    diffs = max_diffs(ours, theirs)
    print(f"\n[parity] {direction:28s} {name:28s} max|d| image {diffs[0]:.1e} text {diffs[1]:.1e} "
          f"logits {diffs[2]:.1e}")  # fmt: skip
    assert diffs[0] < TOL and diffs[1] < TOL, diffs
    assert diffs[2] < TOL * logit_scale, diffs


@pytest.mark.parametrize("name", SHAPES)
def test_export_hf_matches_transformers(name, tmp_path):
    config = SHAPES[name]
    params = random_params(config)
    eos_id, bos_id = 3, 2  # our sentencepiece ids
    files.save(str(tmp_path), params, config, "hf", eos_id=eos_id, bos_id=bos_id)
    model = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    images, tokens = make_inputs(config, eos_id, bos_id)
    ours = clip_jax_outputs(config, params, images, tokens)
    assert_parity(
        name, "clip_jax -> HF", ours, hf_outputs(model, images, tokens), model.logit_scale.exp().item()
    )


def random_hf_model(config: CLIPConfig, seed: int = 0):
    """A transformers CLIPModel of ``config``'s shapes, every tensor random."""
    t, v = config.text, config.vision
    vocab = t.vocab_size
    hf_config = transformers.CLIPConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": t.activation,
            "eos_token_id": vocab - 1, "bos_token_id": vocab - 2, "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
            "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": v.activation,
        },
        projection_dim=config.embed_dim,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.CLIPModel(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", SHAPES)
def test_import_hf_matches_transformers(name, tmp_path):
    expected = SHAPES[name]
    model = random_hf_model(expected)
    model.save_pretrained(str(tmp_path))
    config, params = files.load(str(tmp_path))
    assert config == expected
    vocab = config.text.vocab_size
    images, tokens = make_inputs(config, eos_id=vocab - 1, bos_id=vocab - 2)
    ours = clip_jax_outputs(config, params, images, tokens)
    assert_parity(
        name, "HF -> clip_jax", ours, hf_outputs(model, images, tokens), model.logit_scale.exp().item()
    )


def openai_reference(sd: dict, config: CLIPConfig, images, tokens):
    """OpenAI's CLIP forward pass (clip/model.py) in torch on an OpenAI-layout state dict."""
    f = torch.nn.functional
    sd = {k: torch.tensor(v) for k, v in sd.items()}

    def ln(x, key):
        return f.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], 1e-5)

    def blocks(x, prefix, tower, mask):
        for i in range(tower.layers):
            p = f"{prefix}transformer.resblocks.{i}"
            attn = torch.nn.MultiheadAttention(tower.width, tower.heads, batch_first=True)
            attn.load_state_dict({k.removeprefix(f"{p}.attn."): v for k, v in sd.items() if ".attn." in k
                                  and k.startswith(f"{p}.")})  # fmt: skip
            h = ln(x, f"{p}.ln_1")
            x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = f.linear(ln(x, f"{p}.ln_2"), sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
            h = h * torch.sigmoid(1.702 * h) if tower.activation == "quick_gelu" else f.gelu(h)
            x = x + f.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
        return x

    with torch.no_grad():
        v = config.vision
        x = f.conv2d(
            torch.tensor(images.transpose(0, 3, 1, 2)), sd["visual.conv1.weight"], stride=v.patch_size
        )
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1)
        x = blocks(ln(x + sd["visual.positional_embedding"], "visual.ln_pre"), "visual.", v, None)
        image = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
        length = tokens.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)
        text = torch.tensor(tokens, dtype=torch.long)
        x = sd["token_embedding.weight"][text] + sd["positional_embedding"]
        x = ln(blocks(x, "", config.text, mask), "ln_final")
        text_features = x[torch.arange(len(tokens)), text.argmax(-1)] @ sd["text_projection"]
    image_emb = f.normalize(image, dim=-1).numpy()
    text_emb = f.normalize(text_features, dim=-1).numpy()
    return image_emb, text_emb, sd["logit_scale"].exp().item() * image_emb @ text_emb.T


@pytest.mark.parametrize("name", SHAPES)
def test_export_open_clip_matches_openai_reference(name, tmp_path):
    config = SHAPES[name]
    params = random_params(config, seed=1)
    vocab = config.text.vocab_size
    files.save(str(tmp_path), params, config, "open_clip", eos_id=vocab - 1, bos_id=vocab - 2)
    sd = load_file(str(tmp_path / files.OPEN_CLIP_WEIGHTS))
    # OpenAI's pooling is argmax(token id): EOS must be the largest id.
    images, tokens = make_inputs(config, eos_id=vocab - 1, bos_id=vocab - 2)
    ours = clip_jax_outputs(config, params, images, tokens)
    theirs = openai_reference(sd, config, images, tokens)
    assert_parity(name, "clip_jax -> OpenAI (torch)", ours, theirs, float(np.exp(params["logit_scale"])))
    heads = {"vision_heads": config.vision.heads, "text_heads": config.text.heads}
    inferred, _ = files.load(str(tmp_path), activation=config.text.activation, **heads)
    assert inferred.vision == dataclasses.replace(config.vision, activation=config.text.activation)
    assert inferred.text == config.text and inferred.embed_dim == config.embed_dim


def test_round_trips_are_exact(tmp_path):
    """HF -> import -> export HF/open_clip/params -> import ... gives bit-identical tensors."""
    config = SHAPES["v64h4p8i32-t48h3-quickgelu"]
    random_hf_model(config, seed=2).save_pretrained(str(tmp_path / "hf_in"))
    original = load_file(str(tmp_path / "hf_in" / files.HF_WEIGHTS))
    _, params = files.load(str(tmp_path / "hf_in"))
    heads = {"vision_heads": config.vision.heads, "text_heads": config.text.heads}
    for fmt in ("hf", "open_clip", "params"):  # big_vision holds SigLIP towers only (test_big_vision)
        out = str(tmp_path / fmt)
        _, written = files.save(out, params, config, fmt, eos_id=99, bos_id=98)
        loaded_config, loaded = files.load(out, **heads) if fmt == "open_clip" else files.load(out)
        assert loaded_config == config, fmt
        _, rewritten = files.save(str(tmp_path / f"{fmt}_again"), loaded, config, fmt, eos_id=99, bos_id=98)
        assert written.keys() == rewritten.keys()
        for key in written:
            np.testing.assert_array_equal(written[key], rewritten[key], err_msg=f"{fmt}:{key}")
    exported = load_file(str(tmp_path / "hf" / files.HF_WEIGHTS))
    assert exported.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)


def test_torch_checkpoints_and_conversion_between_formats(tmp_path):
    """An open_clip training checkpoint (.pt, DDP "module." names) imports; --weights conversion
    keeps the special ids the weights record."""
    config = SHAPES["v96h2p14i28-t64h8-gelu"]
    params = random_params(config, seed=3)
    _, tensors = files.save(str(tmp_path / "oc"), params, config, "open_clip", eos_id=299, bos_id=298)
    state = {"epoch": 1, "state_dict": {f"module.{k}": torch.tensor(v) for k, v in tensors.items()}}
    torch.save(state, tmp_path / "epoch_1.pt")
    loaded_config, loaded = files.load(
        str(tmp_path / "epoch_1.pt"), vision_heads=2, text_heads=8, activation="gelu"
    )
    assert loaded_config == config
    for path, value in mapping.flatten(params).items():
        np.testing.assert_array_equal(mapping.flatten(loaded)[path], value, err_msg=path)

    files.save(str(tmp_path / "p"), params, config, "params", eos_id=5, bos_id=4)
    summary = export.export(export.from_weights(str(tmp_path / "p")), "hf", str(tmp_path / "hf"))
    assert summary["tensors"] == len(hf.tensor_maps(config)) and summary["step"] is None
    assert files.special_ids(str(tmp_path / "hf")) == (5, 4)
    assert export.from_weights(str(tmp_path / "oc"))["eos_id"] == config.text.vocab_size - 1  # OpenAI's


def test_scanned_blocks_export_as_per_block_tensors():
    """A ``transformer/blocks`` subtree with a leading layer axis exports as block_0 ... block_{L-1}."""
    config = SHAPES["v32h1p4i16-t32h2-mixed"]
    params = random_params(config)
    per_block = files.external_tensors(params, config, "hf")
    from_scanned = files.external_tensors(scan_layout.stacked(params), config, "hf")
    assert per_block.keys() == from_scanned.keys()
    for key in per_block:
        np.testing.assert_array_equal(per_block[key], from_scanned[key], err_msg=key)


def test_import_refuses_what_clip_jax_cannot_run(tmp_path):
    config = SHAPES["v32h1p4i16-t32h2-mixed"]
    files.save(str(tmp_path), random_params(config), config, "hf", eos_id=63, bos_id=62)
    hf_json = hf.hf_config(config, 1.0, eos_id=63, bos_id=62)
    bad = {**hf_json, "vision_config": {**hf_json["vision_config"], "hidden_act": "gelu_new"}}
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        hf.clip_config(bad)
    with pytest.raises(ValueError, match="legacy argmax"):
        hf.hf_config(config, 1.0, eos_id=2, bos_id=1)
    tensors = load_file(str(tmp_path / files.HF_WEIGHTS))
    del tensors["text_projection.weight"]
    with pytest.raises(ValueError, match="text_projection.weight"):
        mapping.from_external(tensors, hf.tensor_maps(config))
    with pytest.raises(ValueError, match="no external name"):
        mapping.to_external({**random_params(config), "extra": np.zeros(3)}, openai.tensor_maps(config))


def tiny_run(workdir: str):
    """Two training steps of the tiny model on 64 generated scenes, read as plain ArrayRecord
    files (config.data.train_files + tokenizer: no held-out evaluation to compile)."""
    data = scenes.ensure_dataset(
        os.path.join(workdir, "data"), num_train=64, num_heldout_things=16, num_heldout_scenes=16,
        image_size=40, vocab_size=128, seed=0,
    )  # fmt: skip
    config = load_config("demo")
    config.data.scenes = None
    config.eval.evaluators = {}  # the demo's scene evaluator needs the scenes
    config.data.update(train_files=",".join(data.train_files), tokenizer=data.tokenizer)
    config.train.update(batch_size=16, total_steps=2, log_every=1)
    config.optim.warmup_steps = 1
    config.checkpoint.every = 1
    return train.run(config, workdir)


def test_cli_exports_a_training_run(tmp_path):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    trained = jax.tree.map(np.asarray, tiny_run(workdir)["state"].params)
    cmd = [sys.executable, "-m", "clip_jax.export", f"--workdir={workdir}", "--format=hf", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = sum(x.size for x in jax.tree.leaves(trained))
    assert f"exported hf (step 2): 126 tensors, {count:,} parameters" in proc.stdout, proc.stdout

    source = export.from_workdir(workdir, step=2)
    for path, value in mapping.flatten(trained).items():
        np.testing.assert_array_equal(mapping.flatten(source["params"])[path], value, err_msg=path)
    summary = export.export(source, "params", str(tmp_path / "params"))
    assert summary["params"] == count and os.path.exists(tmp_path / "params" / "tokenizer.model")
    config, params = files.load(str(tmp_path / "params"))
    assert config == source["config"]

    model = transformers.CLIPModel.from_pretrained(out).eval()
    images, tokens = make_inputs(config, eos_id=3, bos_id=2)
    ours = clip_jax_outputs(config, params, images, tokens)
    assert_parity("demo run (tiny)", "CLI workdir -> HF", ours, hf_outputs(model, images, tokens),
                  model.logit_scale.exp().item())  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no step 7"):
        export.from_workdir(workdir, step=7)
