"""Every recipe builds at full size (abstractly), and bad values fail early, by name."""

import jax
import pytest
from conftest import CONFIGS_DIR, load_config

from clip_jax import recipe, step, train, validation
from clip_jax.models import clip

CONFIGS = sorted(p.stem for p in CONFIGS_DIR.glob("*.py"))


def with_data(config):
    if not config.data.get("scenes"):
        config.data.train_files, config.data.tokenizer = "/data/train-*.array_record", "/data/tok.model"
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_at_full_size(name):
    config = with_data(load_config(name))
    validation.check_config(config)
    model = recipe.build_model(config)
    tx, _ = train.optim.make_optimizer(config.optim, config.train.total_steps)
    state = jax.eval_shape(lambda: step.init_state(model, tx, jax.random.key(0)))
    count = sum(x.size for x in jax.tree.leaves(state.params))
    assert count > 0
    assert len(jax.tree.leaves(state.opt_state)) > len(jax.tree.leaves(state.params))


def test_b16_is_the_paper_recipe():
    config = load_config("b16")
    assert config.model.variant == "ViT-B/16" and config.model.dtype == "bfloat16"
    assert config.train.batch_size == 32768
    assert config.train.total_steps * config.train.batch_size == 32 * 400_000_000
    o = config.optim
    assert (o.lr, o.weight_decay, o.b1, o.b2, o.eps, o.warmup_steps) == (5e-4, 0.2, 0.9, 0.98, 1e-6, 2000)
    model = recipe.build_model(config)
    state = jax.eval_shape(lambda: model.init(jax.random.key(0), *clip.dummy_inputs(model.config)))
    params = jax.tree.leaves(train.nn.meta.unbox(state["params"]))
    assert sum(x.size for x in params) == 149_620_737


def run_must_fail(config, tmp_path, monkeypatch, match):
    """train.run raises a ConfigError matching ``match`` before anything is compiled."""

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(train.jax, "jit", no_compile)
    with pytest.raises(validation.ConfigError, match=match):
        train.run(config, str(tmp_path))


def demo_config():
    return load_config("demo")


def test_batch_not_divisible_by_devices(tmp_path, monkeypatch):
    config = demo_config()
    config.train.batch_size = 12  # 8 batch-sharded devices
    run_must_fail(config, tmp_path, monkeypatch, r"config.train.batch_size=12 .*data x fsdp = 8")


def test_unknown_variant(tmp_path, monkeypatch):
    config = demo_config()
    config.model.variant = "ViT-Q/7"
    run_must_fail(config, tmp_path, monkeypatch, r"config.model.variant='ViT-Q/7' is unknown")


def test_missing_data_path_for_b16(tmp_path, monkeypatch):
    config = load_config("b16")
    run_must_fail(config, tmp_path, monkeypatch, r"config.data.train_files is required")


def test_data_path_matching_nothing(tmp_path, monkeypatch):
    config = with_data(load_config("b32"))
    config.data.train_files = str(tmp_path / "nothing-*.array_record")
    config.sharding.mesh = {"data": -1, "fsdp": 1, "model": 1}
    run_must_fail(config, tmp_path, monkeypatch, r"config.data.train_files=.* matches no files")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("train.total_steps", 0, r"config.train.total_steps=0 must be >= 1"),
        ("train.loss", "hinge", r"config.train.loss='hinge' is unknown"),
        ("optim.lr", -1.0, r"config.optim.lr=-1.0 must be > 0"),
        ("model.dtype", "int8", r"config.model.dtype='int8'"),
    ],
)
def test_bad_values_are_named(tmp_path, monkeypatch, field, value, match):
    config = demo_config()
    section, name = field.split(".")
    config[section][name] = value
    run_must_fail(config, tmp_path, monkeypatch, match)


def test_bad_mesh_is_named_before_compiling(tmp_path, monkeypatch):
    config = demo_config()
    config.sharding.mesh = {"data": 3, "fsdp": 1, "model": 1}
    monkeypatch.setattr(train.jax, "jit", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ValueError, match=r"config.sharding.mesh=.*needs 3 devices"):
        train.run(config, str(tmp_path))
