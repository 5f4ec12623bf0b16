"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

from clip_jax.data import scenes  # noqa: E402


@pytest.fixture(scope="session")
def scenes_dataset(tmp_path_factory) -> scenes.ScenesDataset:
    """A small synthetic-scenes dataset (32 px), shared by the data and training tests."""
    return scenes.ensure_dataset(
        str(tmp_path_factory.mktemp("scenes")),
        num_train=512,
        num_heldout_things=64,
        num_heldout_scenes=64,
        image_size=40,
        vocab_size=128,
        seed=0,
    )


CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str):
    """``configs/NAME.py``'s get_config(), unlocked for the test to adjust."""
    spec = importlib.util.spec_from_file_location(name, CONFIGS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().unlock()
