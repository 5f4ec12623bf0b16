"""OpenAI's ResNet image towers (RN50, RN101, RN50x4, ...): parameter counts, logical axis
names, frozen BatchNorm, and parity through the OpenAI-layout import/export path with a
torch ModifiedResNet written here from OpenAI's clip/model.py. Run with ``-s`` to see
the parity figures."""

from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from clip_jax import losses, sharding
from clip_jax.interop import files, mapping, openai, openai_resnet
from clip_jax.models import clip, resnet
from clip_jax.models.clip import CLIP, CLIPConfig
from clip_jax.models.resnet import ResNetConfig
from clip_jax.models.text import TextConfig

torch = pytest.importorskip("torch")
F = torch.nn.functional

# OpenAI's checkpoints (ANCHORS.md): total parameters, logit scale included; BN statistics excluded.
OPENAI_COUNTS = {"RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601}
RN50_VISUAL = 38_316_896

TINY_TEXT = TextConfig(vocab_size=64, context_length=8, width=32, layers=1, heads=2)
SHAPES = {
    # Every stage one block; 64 px -> a 2x2 grid; attention pool of 512 channels, 4 heads.
    "rn-l1111-w16-i64": CLIPConfig(24, ResNetConfig((1, 1, 1, 1), 16, 64, heads=4), TINY_TEXT),
    # RN50's image tower exactly (layers, widths, heads, output dim), at 64 px.
    "RN50-layout-i64": CLIPConfig(1024, ResNetConfig((3, 4, 6, 3), 64, 64, heads=32), TINY_TEXT),
}
TOL = 2e-5  # float32, max abs diff of image features, relative to their largest entry


def abstract_variables(config: CLIPConfig):
    model = CLIP(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *clip.dummy_inputs(config)))


@pytest.mark.parametrize("name", sorted(OPENAI_COUNTS))
def test_parameter_count_equals_openai(name):
    variables = nn.meta.unbox(abstract_variables(clip.get_variant(name)))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == OPENAI_COUNTS[name]
    if name == "RN50":
        assert sum(x.size for x in jax.tree.leaves(variables["params"]["visual"])) == RN50_VISUAL
        visual = variables["params"]["visual"]
        assert visual["conv1"]["kernel"].shape == (3, 3, 3, 32)
        assert visual["attnpool"]["pos_embedding"].shape == (50, 2048)
        assert visual["attnpool"]["out"]["kernel"].shape == (32, 64, 1024)  # heads 32 x 64 -> 1024
        stats = variables["batch_stats"]["visual"]["layer4"]["block_0"]["downsample_bn"]
        assert stats["mean"].shape == stats["var"].shape == (2048,)


def test_every_parameter_has_logical_axis_names_known_to_the_rules():
    boxed = abstract_variables(clip.get_variant("tiny-rn"))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    known = {name for name, _ in sharding.RULES}
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim, leaf
        assert set(leaf.names) - {None} <= known, leaf.names
    # Batch statistics are a separate, unboxed collection (never trained, never decayed).
    stats = abstract_variables(clip.get_variant("tiny-rn"))["batch_stats"]
    assert not any(isinstance(x, nn.LogicallyPartitioned) for x in jax.tree.leaves(stats))


def test_variants_and_config_round_trip():
    assert clip.get_variant("RN50x64").vision == ResNetConfig((3, 15, 36, 10), 128, 448, 64)
    assert clip.get_variant("RN50x16").text.width == 768
    for name in ("RN50", "tiny-rn"):
        config = clip.get_variant(name)
        restored = files.config_from_dict(files.config_to_dict(config))
        assert restored == config and isinstance(restored.vision, ResNetConfig)
    with pytest.raises(ValueError, match="multiple of 32"):
        ResNetConfig((1, 1, 1, 1), 16, 40, 4)
    with pytest.raises(ValueError, match="patch_dropout"):
        config = clip.get_variant("tiny-rn")
        CLIP(config, patch_dropout=0.5).init(jax.random.key(0), *clip.dummy_inputs(config))


# --- a torch reference, written from OpenAI's clip/model.py ------------------------------------


class TorchBottleneck(torch.nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        nn_ = torch.nn
        self.conv1, self.bn1 = nn_.Conv2d(inplanes, planes, 1, bias=False), nn_.BatchNorm2d(planes)
        self.conv2 = nn_.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn_.BatchNorm2d(planes)
        self.avgpool = nn_.AvgPool2d(stride) if stride > 1 else nn_.Identity()
        self.conv3, self.bn3 = nn_.Conv2d(planes, planes * 4, 1, bias=False), nn_.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn_.Sequential(OrderedDict([
                ("-1", nn_.AvgPool2d(stride)),
                ("0", nn_.Conv2d(inplanes, planes * 4, 1, stride=1, bias=False)),
                ("1", nn_.BatchNorm2d(planes * 4)),
            ]))  # fmt: skip

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class TorchAttentionPool2d(torch.nn.Module):
    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        self.positional_embedding = torch.nn.Parameter(
            torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5
        )
        self.k_proj, self.q_proj = (
            torch.nn.Linear(embed_dim, embed_dim),
            torch.nn.Linear(embed_dim, embed_dim),
        )
        self.v_proj, self.c_proj = (
            torch.nn.Linear(embed_dim, embed_dim),
            torch.nn.Linear(embed_dim, output_dim),
        )
        self.num_heads = num_heads

    def forward(self, x):
        x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
        x = x + self.positional_embedding[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False,
        )  # fmt: skip
        return x.squeeze(0)


class TorchModifiedResNet(torch.nn.Module):
    def __init__(self, layers, output_dim, heads, input_resolution, width):
        super().__init__()
        nn_ = torch.nn
        self.conv1 = nn_.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn_.BatchNorm2d(width // 2)
        self.conv2 = nn_.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn_.BatchNorm2d(width // 2)
        self.conv3 = nn_.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn_.BatchNorm2d(width)
        self.avgpool = nn_.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = TorchAttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [TorchBottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        layers += [TorchBottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return torch.nn.Sequential(*layers)

    def forward(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


def torch_resnet(config: CLIPConfig, seed: int = 0) -> TorchModifiedResNet:
    """The reference in eval mode with random BN affines and running statistics."""
    v = config.vision
    torch.manual_seed(seed)
    model = TorchModifiedResNet(v.layers, config.embed_dim, v.heads, v.image_size, v.width).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, torch.nn.Linear):
                module.bias.normal_(0, 0.1)
    return model


def torch_features(model: TorchModifiedResNet, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(images.transpose(0, 3, 1, 2))).numpy()


def random_weights(config: CLIPConfig, seed: int = 0) -> dict:
    """Params + batch_stats of ``config``'s shapes (`openai_resnet.merge_variables`), every
    tensor random at a scale that keeps activations O(1) through the tower."""
    shapes = jax.tree.map(lambda x: np.zeros(x.shape), nn.meta.unbox(abstract_variables(config)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in mapping.flatten(openai_resnet.merge_variables(shapes)).items():
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path.endswith("/var"):
            flat[path] = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        elif path.endswith("/scale"):
            flat[path] = 1 + 0.2 * noise
        elif leaf.ndim >= 2:  # kernels and embeddings: fan-in scaled
            flat[path] = noise * np.float32(
                np.prod(leaf.shape[:-1] if leaf.ndim == 4 else leaf.shape[:1]) ** -0.5
            )
        else:
            flat[path] = 0.2 * noise
    flat["logit_scale"] = np.float32(np.log(1 / 0.07))
    return mapping.unflatten(flat)


def clip_jax_features(
    config: CLIPConfig, weights: dict, images: np.ndarray, train: bool = False
) -> np.ndarray:
    """Unnormalised image features [B, E] from the clip_jax model (params + batch_stats)."""
    fn = jax.jit(lambda v, x: CLIP(config).apply(v, x, method=lambda m, x: m.visual(x, train)))
    return np.asarray(fn(openai_resnet.split_variables(weights), images))


def images_for(config: CLIPConfig, seed: int = 0) -> np.ndarray:
    s = config.vision.image_size
    return np.random.default_rng(seed).standard_normal((2, s, s, 3)).astype(np.float32)


def assert_parity(name: str, direction: str, ours: np.ndarray, theirs: np.ndarray):
    diff, scale = float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())
    print(f"\n[parity] {direction:32s} {name:18s} max|d| {diff:.1e} (max|feature| {scale:.1e}, "
          f"relative {diff / scale:.1e})")  # fmt: skip
    assert diff < TOL * scale, (diff, scale)


@pytest.mark.parametrize("name", SHAPES)
def test_import_openai_resnet_matches_torch_reference(name, tmp_path):
    """OpenAI-layout state dict (torch reference's visual.* + a text tower) -> files.load -> same features."""
    config = SHAPES[name]
    reference = torch_resnet(config)
    _, tensors = files.save(
        str(tmp_path / "text"), random_weights(config), config, "open_clip", eos_id=63, bos_id=62
    )
    state = {k: v for k, v in tensors.items() if not k.startswith("visual.")}
    state.update({f"visual.{k}": v for k, v in reference.state_dict().items()})  # incl. num_batches_tracked
    torch.save({k: torch.tensor(np.asarray(v)) for k, v in state.items()}, tmp_path / "openai.pt")
    loaded_config, weights = files.load(
        str(tmp_path / "openai.pt"),
        vision_heads=config.vision.heads,
        text_heads=config.text.heads,
        activation=config.text.activation,
    )
    assert loaded_config == config
    images = images_for(config)
    assert_parity(name, "OpenAI (torch) -> clip_jax", clip_jax_features(config, weights, images),
                  torch_features(reference, images))  # fmt: skip


def test_export_open_clip_matches_torch_reference(tmp_path):
    """clip_jax weights -> open_clip safetensors -> strict load into the torch reference -> same features."""
    name = "rn-l1111-w16-i64"
    config = SHAPES[name]
    weights = random_weights(config, seed=1)
    files.save(str(tmp_path), weights, config, "open_clip", eos_id=63, bos_id=62)
    tensors = load_file(str(tmp_path / files.OPEN_CLIP_WEIGHTS))
    reference = torch_resnet(config, seed=5)
    visual = {
        k.removeprefix("visual."): torch.tensor(v) for k, v in tensors.items() if k.startswith("visual.")
    }
    reference.load_state_dict(visual, strict=True)  # every key, no extra (num_batches_tracked filled in)
    images = images_for(config, seed=1)
    ours = clip_jax_features(config, weights, images)
    assert_parity(name, "clip_jax -> open_clip (torch)", ours, torch_features(reference, images))
    # BatchNorm is frozen: train=True runs on the running statistics, as at evaluation.
    np.testing.assert_array_equal(clip_jax_features(config, weights, images, train=True), ours)


def test_round_trips_are_exact(tmp_path):
    """open_clip and params exports re-import bit-identically, batch statistics included; HF refuses."""
    config = SHAPES["rn-l1111-w16-i64"]
    weights = random_weights(config, seed=2)
    flat = mapping.flatten(weights)
    assert any(p.startswith("batch_stats/visual/layer1/block_0/bn1/") for p in flat)
    for fmt in ("open_clip", "params"):
        _, written = files.save(str(tmp_path / fmt), weights, config, fmt, eos_id=63, bos_id=62)
        loaded_config, loaded = files.load(
            str(tmp_path / fmt), vision_heads=config.vision.heads, text_heads=config.text.heads
        )
        assert loaded_config == config, fmt
        loaded_flat = mapping.flatten(loaded)
        assert loaded_flat.keys() == flat.keys(), fmt
        for path, value in flat.items():
            np.testing.assert_array_equal(loaded_flat[path], value, err_msg=f"{fmt}:{path}")
        _, again = files.save(str(tmp_path / f"{fmt}_again"), loaded, config, fmt, eos_id=63, bos_id=62)
        for key in written:
            np.testing.assert_array_equal(again[key], written[key], err_msg=f"{fmt}:{key}")
    assert len(openai.tensor_maps(config)) == len(
        load_file(str(tmp_path / "open_clip" / files.OPEN_CLIP_WEIGHTS))
    )
    with pytest.raises(ValueError, match="no ResNet image tower"):
        files.save(str(tmp_path / "hf"), weights, config, "hf", eos_id=63, bos_id=62)


def test_forward_flops_counts_convs_and_attention_pool():
    """By hand for layers (1, 1, 1, 1), width 8, 32 px, output 16: 2 x multiply-adds of every conv
    (k x k x in x out per output pixel) and of the attention pool (1 query, 1 + 1 tokens, width 256)."""
    conv = lambda px, k, c_in, c_out: 2 * px * px * k * k * c_in * c_out
    stem = conv(16, 3, 3, 4) + conv(16, 3, 4, 4) + conv(16, 3, 4, 8)  # then pool to 8 px
    # (conv1, conv2) at the input size, then (conv3, shortcut conv) after the stride's pool.
    layer1 = conv(8, 1, 8, 8) + conv(8, 3, 8, 8) + conv(8, 1, 8, 32) + conv(8, 1, 8, 32)
    layer2 = conv(8, 1, 32, 16) + conv(8, 3, 16, 16) + conv(4, 1, 16, 64) + conv(4, 1, 32, 64)
    layer3 = conv(4, 1, 64, 32) + conv(4, 3, 32, 32) + conv(2, 1, 32, 128) + conv(2, 1, 64, 128)
    layer4 = conv(2, 1, 128, 64) + conv(2, 3, 64, 64) + conv(1, 1, 64, 256) + conv(1, 1, 128, 256)
    d = 256
    pool = 2 * d * d + 2 * (2 * 2 * d * d) + 2 * (2 * 2 * d) + 2 * d * 16  # q; k, v; scores, mix; out
    expected = stem + layer1 + layer2 + layer3 + layer4 + pool
    assert resnet.forward_flops(ResNetConfig((1, 1, 1, 1), 8, 32, heads=4), 16) == expected


def test_tiny_rn_learns_with_frozen_batch_norm():
    """tiny-rn, from random weights with random (frozen) running statistics, fits a fixed batch:
    the contrastive loss falls over 30 Adam steps (the compile dominates; a step costs ~0.1 s).
    batch_stats are constants of the step (never trained nor updated), as `resnet` documents;
    train.py does not carry them yet."""
    config = clip.get_variant("tiny-rn")
    model, variables = CLIP(config), openai_resnet.split_variables(random_weights(config, seed=3))
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    # Noise images told apart by a colour each; token rows [6 random ids, pad ...].
    images = rng.standard_normal((8, 64, 64, 3)) + 2 * rng.standard_normal((8, 1, 1, 3))
    tokens = np.concatenate([rng.integers(1, 256, (8, 6)), np.zeros((8, 10))], 1)
    images, tokens = jnp.asarray(images, jnp.float32), jnp.asarray(tokens, jnp.int32)

    @jax.jit
    def step(params, opt_state):
        def loss_of(params):
            out = model.apply({"params": params, "batch_stats": stats}, images, tokens, True)
            return losses.softmax_contrastive(*out)[0]

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, history = tx.init(params), []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        history.append(float(loss))
    print(f"\n[tiny-rn] loss {history[0]:.3f} -> {history[-1]:.3f}")
    assert max(history[-3:]) < 0.5 * history[0], history


def test_resnet_tower_trains_through_the_train_step_with_frozen_batch_norm():
    """tiny-rn through step.make_train_step: params move, the BatchNorm statistics do not."""
    from clip_jax import optim, recipe, step
    from clip_jax.config_defaults import base_config

    config = base_config()
    config.model.update(variant="tiny-rn", dtype="float32")
    config.optim.update(lr=3e-4, warmup_steps=0, weight_decay=0.0)
    model = recipe.build_model(config)
    tx, schedule = optim.make_optimizer(config.optim, total_steps=100)
    mesh = sharding.make_mesh({"data": 2}, jax.devices()[:2])
    rng = np.random.default_rng(0)
    size, length = model.config.vision.image_size, model.config.text.context_length
    batch = {
        "image": rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
        "tokens": rng.integers(4, 200, (8, length)).astype(np.int32),
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        _, shardings = step.state_shardings(model, tx, mesh)
        state = jax.jit(lambda r: step.init_state(model, tx, r), out_shardings=shardings)(jax.random.key(0))
        assert "batch_stats" in state.model_state
        before = jax.device_get(state)
        step_fn = step.compile_train_step(
            step.make_train_step(model, tx, schedule, losses.make_loss("softmax", mesh)), shardings, mesh
        )
        losses_seen = []
        for _ in range(10):
            state, metrics = step_fn(state, sharding.to_global(batch, mesh))
            losses_seen.append(float(metrics["loss"]))
    after = jax.device_get(state)
    stats_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), before.model_state, after.model_state)
    assert all(jax.tree.leaves(stats_equal))
    moved = np.abs(after.params["visual"]["conv1"]["kernel"] - before.params["visual"]["conv1"]["kernel"])
    assert moved.max() > 0
    assert losses_seen[-1] < losses_seen[0]


def test_init_from_an_imported_resnet_carries_its_batch_statistics(tmp_path):
    """config.train.init_from of an RN export: the fine-tuning state starts from the
    file's BatchNorm running statistics, not from a fresh model's (mean 0, variance 1)."""
    from clip_jax import inference

    config = SHAPES["rn-l1111-w16-i64"]
    weights = random_weights(config, seed=3)
    files.save(str(tmp_path / "rn"), weights, config, "params", eos_id=63, bos_id=62)
    fresh = jax.tree.map(jnp.zeros_like, abstract_variables(config))  # a model's own variables
    params, model_state = inference.matching_variables(
        str(tmp_path / "rn"), nn.meta.unbox(fresh["params"]), {"batch_stats": fresh["batch_stats"]}
    )
    expected = mapping.flatten(weights)
    got = mapping.flatten({**params, **model_state})
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    assert any(np.any(v != 0) for k, v in got.items() if k.startswith("batch_stats/"))
    with pytest.raises(ValueError, match="no BatchNorm statistics"):
        no_stats = {k: v for k, v in weights.items() if k != "batch_stats"}
        files.save(str(tmp_path / "vit_like"), no_stats, config, "params", eos_id=63, bos_id=62)
        inference.matching_variables(
            str(tmp_path / "vit_like"), nn.meta.unbox(fresh["params"]), {"batch_stats": fresh["batch_stats"]}
        )
