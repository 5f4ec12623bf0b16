"""big_vision ``.npz`` checkpoints (SigLIP two-towers) in and out: bit-identical round trips
(scanned or not, with or without ``params/``), and the same outputs as transformers'
SiglipModel loaded from the same arrays through a key map written here from big_vision's
module names (transformers ships no SigLIP conversion script in its wheel)."""

import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clip_jax.interop import big_vision, files, mapping
from clip_jax.models import clip

# (image: size, patch, width, layers, heads, mlp), (text: vocab, context, layers, heads, mlp).
# big_vision's SigLIP text width is the image width (the embedding has no image head).
SHAPES = {
    "b16_like": ((32, 8, 64, 2, 4, 96), (100, 12, 2, 4, 128)),
    "narrow_heads": ((28, 14, 48, 3, 8, 40), (50, 7, 1, 2, 80)),
}
ATTN = "MultiHeadDotProductAttention_0"


def _block(rng, prefix, width, heads, mlp):
    normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)
    out = {}
    for ln in ("LayerNorm_0", "LayerNorm_1"):
        out[f"{prefix}/{ln}/scale"], out[f"{prefix}/{ln}/bias"] = normal(width), normal(width)
    for name in ("query", "key", "value"):
        out[f"{prefix}/{ATTN}/{name}/kernel"] = normal(width, heads, width // heads)
        out[f"{prefix}/{ATTN}/{name}/bias"] = normal(heads, width // heads)
    out[f"{prefix}/{ATTN}/out/kernel"] = normal(heads, width // heads, width)
    out[f"{prefix}/{ATTN}/out/bias"] = normal(width)
    for dense, shape in (("Dense_0", (width, mlp)), ("Dense_1", (mlp, width))):
        out[f"{prefix}/MlpBlock_0/{dense}/kernel"] = normal(*shape)
        out[f"{prefix}/MlpBlock_0/{dense}/bias"] = normal(shape[1])
    return out


def big_vision_arrays(name, seed=0):
    """Random arrays named and shaped as big_vision's two_towers (vit + text_transformer), unscanned."""
    (size, patch, width, layers, heads, mlp), (vocab, context, t_layers, t_heads, t_mlp) = SHAPES[name]
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)
    out = {
        "img/embedding/kernel": normal(patch, patch, 3, width),
        "img/embedding/bias": normal(width),
        "img/pos_embedding": normal(1, (size // patch) ** 2, width),
        "img/Transformer/encoder_norm/scale": normal(width),
        "img/Transformer/encoder_norm/bias": normal(width),
        "img/MAPHead_0/probe": normal(1, 1, width),
        "txt/Embed_0/embedding": normal(vocab, width),
        "txt/pos_embedding": normal(1, context, width),
        "txt/Encoder_0/encoder_norm/scale": normal(width),
        "txt/Encoder_0/encoder_norm/bias": normal(width),
        "txt/head/kernel": normal(width, width),
        "txt/head/bias": normal(width),
        "t": np.asarray([np.log(10.0) + 0.3], np.float32),
        "b": np.asarray([-10.0 + 0.7], np.float32),
    }
    map_head = _block(rng, "img/MAPHead_0", width, heads, mlp)
    out.update({k: v for k, v in map_head.items() if "LayerNorm_1" not in k})
    for i in range(layers):
        out.update(_block(rng, f"img/Transformer/encoderblock_{i}", width, heads, mlp))
    for i in range(t_layers):
        out.update(_block(rng, f"txt/Encoder_0/encoderblock_{i}", width, t_heads, t_mlp))
    return out


def scanned(arrays):
    """big_vision's pyloop_to_scan: each tower's encoderblock_{i} stacked into one encoderblock."""
    out, stacks = {}, {}
    for key, value in arrays.items():
        head, sep, rest = key.partition("/encoderblock_")
        if not sep:
            out[key] = value
            continue
        index, _, leaf = rest.partition("/")
        stacks.setdefault(f"{head}/encoderblock/{leaf}", {})[int(index)] = value
    out.update({k: np.stack([v[i] for i in range(len(v))]) for k, v in stacks.items()})
    return out


def write_npz(path, arrays, prefix):
    np.savez(path, **{f"{prefix}{k}": v for k, v in arrays.items()})
    return str(path)


def read_npz(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def assert_bitwise_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key].view(np.uint32), b[key].view(np.uint32), err_msg=key)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("prefix", ["params/", ""], ids=["params_prefix", "no_prefix"])
def test_round_trip_is_bit_identical(tmp_path, scan, prefix):
    arrays = big_vision_arrays("b16_like")
    arrays = scanned(arrays) if scan else arrays
    config, params = files.load(write_npz(tmp_path / "in.npz", arrays, prefix))
    assert config.vision.layers == 2 and config.text.layers == 2 and config.vision.image_size == 32
    path, _ = files.save(
        str(tmp_path / "out"), params, config, "big_vision", eos_id=1, bos_id=None, scan=scan
    )
    assert_bitwise_equal(read_npz(path), {f"params/{k}": v for k, v in arrays.items()})
    # The other layout holds the same weights: loaded back, the params are bitwise the same.
    other, _ = files.save(
        str(tmp_path / "other"), params, config, "big_vision", eos_id=1, bos_id=0, scan=not scan
    )
    block = "encoderblock_0" if scan else "encoderblock"
    assert f"params/img/Transformer/{block}/LayerNorm_0/scale" in read_npz(other)
    _, again = files.load(str(tmp_path / "other"))  # the export directory
    assert_bitwise_equal(mapping.flatten(again), mapping.flatten(params))


def hf_state_dict(arrays, vision_layers, text_layers):
    """big_vision names -> transformers' SiglipModel state dict (as its convert_siglip_to_hf.py)."""
    a = lambda key: torch.from_numpy(np.ascontiguousarray(arrays[key]))
    linear_in = lambda key: a(key).reshape(a(key).shape[0], -1).T  # [D, H, Dh] -> [H*Dh, D]
    sd = {}

    def layer_norm(src, dst):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = a(f"{src}/scale"), a(f"{src}/bias")

    def block(src, dst):
        layer_norm(f"{src}/LayerNorm_0", f"{dst}.layer_norm1")
        layer_norm(f"{src}/LayerNorm_1", f"{dst}.layer_norm2")
        for theirs, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            sd[f"{dst}.self_attn.{hf}.weight"] = linear_in(f"{src}/{ATTN}/{theirs}/kernel")
            sd[f"{dst}.self_attn.{hf}.bias"] = a(f"{src}/{ATTN}/{theirs}/bias").reshape(-1)
        out = a(f"{src}/{ATTN}/out/kernel")
        sd[f"{dst}.self_attn.out_proj.weight"] = out.reshape(-1, out.shape[-1]).T
        sd[f"{dst}.self_attn.out_proj.bias"] = a(f"{src}/{ATTN}/out/bias")
        for theirs, hf in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            sd[f"{dst}.mlp.{hf}.weight"] = a(f"{src}/MlpBlock_0/{theirs}/kernel").T
            sd[f"{dst}.mlp.{hf}.bias"] = a(f"{src}/MlpBlock_0/{theirs}/bias")

    v, t, h = "vision_model", "text_model", "img/MAPHead_0"
    sd[f"{v}.embeddings.patch_embedding.weight"] = a("img/embedding/kernel").permute(3, 2, 0, 1)
    sd[f"{v}.embeddings.patch_embedding.bias"] = a("img/embedding/bias")
    sd[f"{v}.embeddings.position_embedding.weight"] = a("img/pos_embedding")[0]
    for i in range(vision_layers):
        block(f"img/Transformer/encoderblock_{i}", f"{v}.encoder.layers.{i}")
    layer_norm("img/Transformer/encoder_norm", f"{v}.post_layernorm")
    sd[f"{v}.head.probe"] = a(f"{h}/probe")
    qkv = ("query", "key", "value")
    sd[f"{v}.head.attention.in_proj_weight"] = torch.cat([linear_in(f"{h}/{ATTN}/{n}/kernel") for n in qkv])
    sd[f"{v}.head.attention.in_proj_bias"] = torch.cat([a(f"{h}/{ATTN}/{n}/bias").reshape(-1) for n in qkv])
    out = a(f"{h}/{ATTN}/out/kernel")
    sd[f"{v}.head.attention.out_proj.weight"] = out.reshape(-1, out.shape[-1]).T
    sd[f"{v}.head.attention.out_proj.bias"] = a(f"{h}/{ATTN}/out/bias")
    layer_norm(f"{h}/LayerNorm_0", f"{v}.head.layernorm")
    for theirs, hf in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        sd[f"{v}.head.mlp.{hf}.weight"] = a(f"{h}/MlpBlock_0/{theirs}/kernel").T
        sd[f"{v}.head.mlp.{hf}.bias"] = a(f"{h}/MlpBlock_0/{theirs}/bias")
    sd[f"{t}.embeddings.token_embedding.weight"] = a("txt/Embed_0/embedding")
    sd[f"{t}.embeddings.position_embedding.weight"] = a("txt/pos_embedding")[0]
    for i in range(text_layers):
        block(f"txt/Encoder_0/encoderblock_{i}", f"{t}.encoder.layers.{i}")
    layer_norm("txt/Encoder_0/encoder_norm", f"{t}.final_layer_norm")
    sd[f"{t}.head.weight"], sd[f"{t}.head.bias"] = a("txt/head/kernel").T, a("txt/head/bias")
    sd["logit_scale"], sd["logit_bias"] = a("t"), a("b")
    return sd


def hf_model(name, arrays):
    (size, patch, width, layers, heads, mlp), (vocab, context, t_layers, t_heads, t_mlp) = SHAPES[name]
    config = transformers.SiglipConfig(
        vision_config=dict(
            image_size=size,
            patch_size=patch,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=mlp,
        ),
        text_config=dict(
            vocab_size=vocab,
            max_position_embeddings=context,
            hidden_size=width,
            num_hidden_layers=t_layers,
            num_attention_heads=t_heads,
            intermediate_size=t_mlp,
            projection_size=width,
        ),
    )  # fmt: skip  (transformers' defaults: tanh GELU, LayerNorm eps 1e-6, as big_vision)
    model = transformers.SiglipModel(config)
    model.load_state_dict(hf_state_dict(arrays, layers, t_layers), strict=True)  # every tensor, once
    return model.eval()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_outputs_equal_transformers_siglip_from_the_same_npz(tmp_path, name):
    arrays = big_vision_arrays(name, seed=1)
    model = hf_model(name, arrays)
    config, params = files.load(write_npz(tmp_path / "w.npz", scanned(arrays), "params/"))
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, config.vision.image_size, config.vision.image_size, 3)).astype(
        np.float32
    )
    tokens = rng.integers(0, config.text.vocab_size, (4, config.text.context_length)).astype(np.int32)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        )
    norm = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()
    theirs = norm(out.image_embeds), norm(out.text_embeds), out.logits_per_image.numpy()
    image_emb, text_emb, scale, bias = clip.CLIP(config).apply(
        {"params": jax.tree.map(jnp.asarray, params)}, images, tokens
    )
    ours = np.asarray(image_emb), np.asarray(text_emb), np.asarray(scale * image_emb @ text_emb.T + bias)
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs, strict=True)]
    print(name, "big_vision npz: clip_jax vs transformers max |diff| image, text, logits:", diffs)
    assert max(diffs[:2]) < 2e-6 and diffs[2] < 2e-5
    assert np.std(theirs[2]) > 0.1  # the logits are not trivially equal


def test_refusals(tmp_path):
    arrays = big_vision_arrays("b16_like")
    with pytest.raises(ValueError, match="no place for"):
        files.load(write_npz(tmp_path / "extra.npz", {**arrays, "img/head/extra": arrays["t"]}, ""))
    mixed = {**{f"params/{k}": v for k, v in arrays.items()}, "opt/mu": arrays["t"]}
    np.savez(tmp_path / "mixed.npz", **mixed)
    with pytest.raises(ValueError, match="outside params/"):
        files.load(str(tmp_path / "mixed.npz"))
    np.savez(tmp_path / "objects.npz", t=np.asarray([object()], dtype=object))
    with pytest.raises(ValueError, match="object, not floating point"):  # refused before unpickling
        files.load(str(tmp_path / "objects.npz"))
    with pytest.raises(ValueError, match="cannot hold"):  # OpenAI's CLIP: class token, quick GELU, ...
        big_vision.tensor_maps(clip.get_variant("tiny"))


def test_reads_are_bounded_by_what_the_archive_claims(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "w.npz", big_vision_arrays("b16_like"), "params/")
    claimed = sum(a.nbytes for a in big_vision_arrays("b16_like").values())
    monkeypatch.setattr(big_vision, "MAX_BYTES", claimed // 2)  # refused before any array is read
    with pytest.raises(ValueError, match="bytes"):
        files.load(path)
    monkeypatch.setattr(big_vision, "MAX_BYTES", 2 * claimed + 2**20)
    files.load(path)


def test_inflating_or_lying_members_are_refused_before_reading(tmp_path):
    arrays = {f"params/{k}": v for k, v in big_vision_arrays("b16_like").items()}
    np.savez_compressed(
        tmp_path / "bomb.npz", **arrays, zeros=np.zeros(2**22, np.float32)
    )  # 16 MiB -> ~16 KiB
    with pytest.raises(ValueError, match="inflates"):
        files.load(str(tmp_path / "bomb.npz"))
    header = io.BytesIO()  # an array header promising 4 TB over 16 bytes: np.load would allocate it
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value if key != "params/t" else np.zeros(0, np.float32))
            archive.writestr(
                f"{key}.npy", buffer.getvalue() if key != "params/t" else header.getvalue() + bytes(16)
            )
    with pytest.raises(ValueError, match="claims"):
        files.load(str(tmp_path / "lie.npz"))
