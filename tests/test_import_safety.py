"""Imports that cannot be silently wrong (issue 14): a state dict whose heads or activation
it does not record loads from its open_clip_config.json, from overrides, or as one of
OpenAI's own shapes, and is refused otherwise.

The reference is transformers' CLIPModel built from the same random weights, converted to
open_clip's layout here in torch (not with clip_jax's mappings).
"""

import json
import os
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import load_config
from safetensors.numpy import save_file

import clip_jax
from clip_jax import inference, validation
from clip_jax.interop import files, open_clip, openai, overrides
from clip_jax.models.clip import CLIP

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT, EMBED = 100, 12, 64
# Vision: 320 wide in 4 heads of 80 (width // 64 would say 5); GELU, not QuickGELU.
VISION = dict(hidden_size=320, intermediate_size=1280, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="gelu")  # fmt: skip
TEXT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=CONTEXT, hidden_act="gelu",
            eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=0)  # fmt: skip
OPEN_CLIP_CONFIG = {
    "model_cfg": {  # open_clip's fields; quick_gelu absent: open_clip's default, GELU
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 320, "head_width": 80, "patch_size": 8},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 128, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711]},
}  # fmt: skip
RIGHT = dict(vision_heads=4, text_heads=2, activation="gelu")
TOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    """A random transformers CLIPModel (4 x 80 vision heads, GELU)."""
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=EMBED)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    return model


RENAMES = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))  # fmt: skip


def open_clip_state_dict(hf_state: dict) -> dict[str, np.ndarray]:
    """HF CLIPModel names -> open_clip's (fused q/k/v, [width, embed] projections)."""
    sd = {k: v.detach().numpy() for k, v in hf_state.items() if not k.endswith("position_ids")}
    out = {
        "visual.conv1.weight": sd.pop("vision_model.embeddings.patch_embedding.weight"),
        "visual.class_embedding": sd.pop("vision_model.embeddings.class_embedding"),
        "visual.positional_embedding": sd.pop("vision_model.embeddings.position_embedding.weight"),
        "visual.proj": sd.pop("visual_projection.weight").T,
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "text_projection": sd.pop("text_projection.weight").T,
        "logit_scale": sd.pop("logit_scale"),
    }
    norms = {"vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm": "visual.ln_post",
             "text_model.final_layer_norm": "ln_final"}  # fmt: skip
    for hf_name, name in norms.items():
        for kind in ("weight", "bias"):
            out[f"{name}.{kind}"] = sd.pop(f"{hf_name}.{kind}")
    for hf_tower, tower, layers in (("vision_model", "visual.", 2), ("text_model", "", 2)):
        for i in range(layers):
            hf_block, block = f"{hf_tower}.encoder.layers.{i}", f"{tower}transformer.resblocks.{i}"
            for kind in ("weight", "bias"):
                qkv = [sd.pop(f"{hf_block}.self_attn.{p}_proj.{kind}") for p in "qkv"]
                out[f"{block}.attn.in_proj_{kind}"] = np.concatenate(qkv)
                for theirs, ours in RENAMES:
                    out[f"{block}.{ours}.{kind}"] = sd.pop(f"{hf_block}.{theirs}.{kind}")
    assert not sd, sorted(sd)  # every tensor placed
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}  # 0-d stays 0-d


@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory):
    """{"config": dir with open_clip_config.json, "bare": the same weights alone, "hf": HF dir}."""
    root = tmp_path_factory.mktemp("weights")
    tensors = open_clip_state_dict(reference.state_dict())
    for name in ("config", "bare"):
        os.makedirs(root / name)
        save_file(tensors, str(root / name / files.OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    (root / "config" / open_clip.CONFIG_FILE).write_text(json.dumps(OPEN_CLIP_CONFIG))
    reference.save_pretrained(str(root / "hf"))
    return {name: str(root / name) for name in ("config", "bare", "hf")}


def inputs(seed: int = 0):
    """uint8 images [4, 32, 32, 3] and token rows [BOS, ids..., EOS, 0...]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    tokens = np.zeros((4, CONTEXT), np.int32)
    for row, n in zip(tokens, (2, 5, CONTEXT - 3, CONTEXT), strict=True):
        row[:n] = [VOCAB - 2, *rng.integers(1, VOCAB - 2, n - 2), VOCAB - 1]
    return images, tokens


def reference_outputs(model, images, tokens):
    preprocess = OPEN_CLIP_CONFIG["preprocess_cfg"]
    mean, std = np.array(preprocess["mean"]), np.array(preprocess["std"])
    pixels = ((images / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), pixel_values=torch.tensor(pixels))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def clip_jax_outputs(model: inference.CLIPModel, images, tokens):
    image_emb = model.encode_image(images)
    text_emb = np.asarray(
        jax.jit(lambda p, t: model.model.apply({"params": p}, t, method=CLIP.encode_text))(
            model.params, tokens
        )
    )
    return image_emb, text_emb, model.logit_scale * image_emb @ text_emb.T


def assert_matches(model: inference.CLIPModel, reference):
    images, tokens = inputs()
    ours, theirs = clip_jax_outputs(model, images, tokens), reference_outputs(reference, images, tokens)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True)]
    print(f"\n[parity] {model.source}: max|d| image {diffs[0]:.1e} text {diffs[1]:.1e} logits {diffs[2]:.1e}")
    assert max(diffs) < TOL, diffs


def test_open_clip_config_gives_heads_and_activation(exported, reference):
    model = clip_jax.load(exported["config"])
    assert (model.config.vision.heads, model.config.text.heads) == (4, 2)
    assert model.config.vision.activation == model.config.text.activation == "gelu"
    assert_matches(model, reference)


def test_bare_state_dict_is_refused_then_loads_with_overrides(exported, reference, tmp_path):
    with pytest.raises(overrides.OverridesError, match=r"vision_heads=N,text_heads=N,activation=gelu") as e:
        clip_jax.load(exported["bare"])
    assert "--weights_overrides" in str(e.value) and "overrides=dict(" in str(e.value)
    assert_matches(clip_jax.load(exported["bare"], overrides=RIGHT), reference)
    # The flag's text says the same; clip_jax's open_clip export records it for the next import.
    config, params = files.load(exported["bare"], "vision_heads=4,text_heads=2,activation=gelu")
    assert (config.vision.heads, config.text.heads, config.text.activation) == (4, 2, "gelu")
    files.save(str(tmp_path / "again"), params, config, "open_clip", eos_id=VOCAB - 1, bos_id=VOCAB - 2)
    assert files.load(str(tmp_path / "again"))[0] == config


def test_hf_directory_honours_its_config(exported, reference):
    model = clip_jax.load(exported["hf"])
    assert (model.config.vision.heads, model.config.vision.activation) == (4, "gelu")
    assert_matches(model, reference)
    with pytest.raises(overrides.OverridesError, match="num_attention|records vision_heads=4"):
        files.load(exported["hf"], vision_heads=5)


def test_overrides_that_contradict_the_shipped_config_are_errors(exported):
    with pytest.raises(overrides.OverridesError, match="vision_heads=4, the overrides say 5"):
        files.load(exported["config"], vision_heads=5)
    with pytest.raises(overrides.OverridesError, match="activation='gelu', the overrides say 'quick_gelu'"):
        files.load(exported["config"], activation="quick_gelu")
    files.load(exported["config"], **RIGHT)  # agreeing is fine
    with pytest.raises(overrides.OverridesError, match="vision_heads=3 does not divide"):
        files.load(exported["bare"], vision_heads=3, text_heads=2, activation="gelu")
    with pytest.raises(overrides.OverridesError, match="vision.width=1280, the weights have 320"):
        files.load(exported["bare"], open_clip_model="ViT-H-14")


def test_unsupported_open_clip_fields_are_refused(exported, tmp_path):
    os.symlink(os.path.join(exported["bare"], files.OPEN_CLIP_WEIGHTS), tmp_path / files.OPEN_CLIP_WEIGHTS)
    for section, field, value in (("text_cfg", "pool_type", "last"), ("vision_cfg", "ls_init_value", 0.1),
                                  ("vision_cfg", "some_new_switch", True), ("vision_cfg", "head_width", "80"),
                                  ("text_cfg", "heads", 0)):  # fmt: skip
        cfg = json.loads(json.dumps(OPEN_CLIP_CONFIG))
        cfg["model_cfg"][section][field] = value
        (tmp_path / open_clip.CONFIG_FILE).write_text(json.dumps(cfg))
        with pytest.raises(overrides.OverridesError, match=f"{field}="):
            files.load(str(tmp_path))


def test_init_from_takes_the_same_overrides(exported):
    config, params = files.load(exported["bare"], **RIGHT)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: CLIP(config).init(jax.random.key(0), *dummy(config))))
    with pytest.raises(overrides.OverridesError, match="vision_heads.*config.train.init_from_overrides"):
        inference.matching_variables(exported["bare"], shapes["params"])
    flag = "vision_heads=4,text_heads=2,activation=gelu"  # config.train.init_from_overrides
    loaded, _ = inference.matching_variables(exported["bare"], shapes["params"], overrides=flag)
    np.testing.assert_array_equal(loaded["visual"]["proj"], params["visual"]["proj"])


def dummy(config):
    s = config.vision.image_size
    return np.zeros((1, s, s, 3), np.float32), np.zeros((1, config.text.context_length), np.int32)


def test_override_flag_format(tmp_path):
    assert overrides.parse("vision_heads=16, text_heads=8,activation=gelu") == overrides.Overrides(
        16, 8, "gelu"
    )
    assert overrides.parse("open_clip_model=ViT-H-14").open_clip_model == "ViT-H-14"
    assert overrides.parse("") == overrides.parse(None) == overrides.Overrides()
    (tmp_path / "o.json").write_text(json.dumps({"vision_heads": 16, "activation": "quick_gelu"}))
    assert overrides.parse(str(tmp_path / "o.json")) == overrides.Overrides(16, None, "quick_gelu")
    for bad, message in (("vision_heads=x", "positive integer"), ("heads=3", "unknown override 'heads'"),
                         ("activation=relu", "quick_gelu"), ("vision_heads", "does not exist"),
                         ("vision_heads=0", "positive integer")):  # fmt: skip
        with pytest.raises(overrides.OverridesError, match=message):
            overrides.parse(bad)
    config = load_config("demo")  # the config field is checked with the others
    config.train.init_from_overrides = "vision_heads=many"
    with pytest.raises(validation.ConfigError, match="init_from_overrides"):
        validation.check_finetune(config)


def test_export_cli_refuses_in_one_line_and_converts_with_the_flag(exported, tmp_path):
    command = [sys.executable, "-m", "clip_jax.export", f"--weights={exported['bare']}", "--format=params"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    refused = subprocess.run([*command, f"--out={tmp_path / 'a'}"], capture_output=True, text=True, env=env)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: ") and "--weights_overrides=" in refused.stderr
    assert not os.path.exists(tmp_path / "a")  # decided before writing
    flag = "--weights_overrides=vision_heads=4,text_heads=2,activation=gelu"
    done = subprocess.run(
        [*command, flag, f"--out={tmp_path / 'b'}"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    config, _ = files.load(str(tmp_path / "b"))
    assert (config.vision.heads, config.vision.activation) == (4, "gelu")


# --- OpenAI's own shapes, recognised without materialising a tensor -------------------------


def openai_vit_shapes(embed, image, patch, width, layers, text_width, text_layers=12):
    """Every tensor shape of OpenAI's ViT CLIP state dict (clip/model.py build_model)."""
    shapes = {"visual.conv1.weight": (width, 3, patch, patch), "visual.class_embedding": (width,),
              "visual.positional_embedding": ((image // patch) ** 2 + 1, width),
              "visual.proj": (width, embed),
              "token_embedding.weight": (49408, text_width), "positional_embedding": (77, text_width),
              "text_projection": (text_width, embed), "logit_scale": ()}  # fmt: skip
    for name, w in (("visual.ln_pre", width), ("visual.ln_post", width), ("ln_final", text_width)):
        shapes.update({f"{name}.weight": (w,), f"{name}.bias": (w,)})
    for prefix, w, n in (("visual.", width, layers), ("", text_width, text_layers)):
        for i in range(n):
            b = f"{prefix}transformer.resblocks.{i}"
            shapes.update({f"{b}.attn.in_proj_weight": (3 * w, w), f"{b}.attn.in_proj_bias": (3 * w,),
                           f"{b}.attn.out_proj.weight": (w, w), f"{b}.attn.out_proj.bias": (w,),
                           f"{b}.mlp.c_fc.weight": (4 * w, w), f"{b}.mlp.c_fc.bias": (4 * w,),
                           f"{b}.mlp.c_proj.weight": (w, 4 * w), f"{b}.mlp.c_proj.bias": (w,)})  # fmt: skip
            for ln in ("ln_1", "ln_2"):
                shapes.update({f"{b}.{ln}.weight": (w,), f"{b}.{ln}.bias": (w,)})
    return shapes


def openai_rn_conv1_shapes(embed, image, depths, width, text_width):
    """The ResNet keys that fix its size: each block's conv1 [planes, in, 1, 1] and the attention pool."""
    shapes = openai_vit_shapes(embed, 224, 32, 8, 0, text_width)
    shapes = {k: v for k, v in shapes.items() if not k.startswith("visual.")}
    inplanes = width
    for s, n in enumerate(depths):
        planes = width * 2**s
        for b in range(n):
            shapes[f"visual.layer{s + 1}.{b}.conv1.weight"] = (planes, inplanes, 1, 1)
            inplanes = planes * 4
    shapes["visual.attnpool.positional_embedding"] = ((image // 32) ** 2 + 1, width * 32)
    shapes["visual.attnpool.c_proj.weight"] = (embed, width * 32)
    return shapes


OPENAI = {
    "ViT-B/32": openai_vit_shapes(512, 224, 32, 768, 12, 512),
    "ViT-B/16": openai_vit_shapes(512, 224, 16, 768, 12, 512),
    "ViT-L/14": openai_vit_shapes(768, 224, 14, 1024, 24, 768),
    "ViT-L/14@336px": openai_vit_shapes(768, 336, 14, 1024, 24, 768),
    "RN50": openai_rn_conv1_shapes(1024, 224, (3, 4, 6, 3), 64, 512),
    "RN101": openai_rn_conv1_shapes(512, 224, (3, 4, 23, 3), 64, 512),
    "RN50x4": openai_rn_conv1_shapes(640, 288, (4, 6, 10, 6), 80, 640),
    "RN50x16": openai_rn_conv1_shapes(768, 384, (6, 8, 18, 8), 96, 768),
    "RN50x64": openai_rn_conv1_shapes(1024, 448, (3, 15, 36, 10), 128, 1024),
}


def abstract(shapes):
    return {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}


@pytest.mark.parametrize("name", OPENAI)
def test_openai_shapes_are_recognised(name):
    assert openai.openai_model(OPENAI[name]) == name


def test_openai_vit_loads_without_overrides_and_others_are_refused():
    tensors = abstract(OPENAI["ViT-L/14"])
    with pytest.warns(UserWarning, match="LAION/DataComp"):
        config = openai.clip_config(tensors)
    assert (config.vision.heads, config.text.heads, config.text.activation) == (16, 12, "quick_gelu")
    with warnings.catch_warnings():  # OpenAI's own TorchScript archive: no doubt left
        warnings.simplefilter("error")
        config = openai.clip_config({**tensors, "input_resolution": jax.ShapeDtypeStruct((), np.int64)})
    assert config.vision.activation == "quick_gelu"
    assert openai.clip_config(tensors, given=overrides.Overrides(activation="gelu")).text.activation == "gelu"
    # open_clip's ViT-H/14: 1280 = 16 x 80 (20 x 64 would be the guess); ViT-g/14 1408 = 16 x 88.
    h14_shapes = openai_vit_shapes(1024, 224, 14, 1280, 32, 1024, 24)
    for shapes in (h14_shapes, openai_vit_shapes(1024, 224, 14, 1408, 40, 1024)):
        assert openai.openai_model(shapes) is None
        with pytest.raises(overrides.OverridesError, match="vision_heads, text_heads, activation"):
            openai.clip_config(abstract(shapes))
    h14 = openai.clip_config(abstract(h14_shapes), given=overrides.Overrides(open_clip_model="ViT-H-14"))
    assert (h14.vision.heads, h14.text.heads, h14.vision.activation) == (16, 16, "gelu")
    # One block more, or another vocabulary, is not OpenAI's model.
    deeper = openai_vit_shapes(512, 224, 32, 768, 13, 512)
    assert openai.openai_model(deeper) is None
    other_vocab = {**OPENAI["ViT-B/32"], "token_embedding.weight": (32000, 512)}
    assert openai.openai_model(other_vocab) is None


def test_openai_resnet_heads():
    config = openai.clip_config(abstract({**OPENAI["RN50x4"], "input_resolution": ()}))
    assert (config.vision.heads, config.text.heads) == (80 * 32 // 64, 10)
