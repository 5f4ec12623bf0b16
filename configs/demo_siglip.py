"""The demo (configs/demo.py) with SigLIP's towers and loss: a tiny two-towers model
(MAP-head image tower, bidirectional text tower pooled at the last position, biased
head) trained with the sigmoid loss computed round the device ring.

    python -m clip_jax.main --config=configs/demo_siglip.py --workdir=/tmp/siglip_demo
"""

import importlib.util
import os


def _demo():
    """configs/demo.py, found beside this file whatever the working directory."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    c = _demo().get_config(arg)
    c.model.variant = "tiny-siglip"
    c.train.loss = "sigmoid_ring"  # clip_jax.losses.BUILDERS; gives the model SigLIP's bias and temperature
    return c
