"""The demo (configs/demo.py) with SigLIP's towers and loss: a tiny two-towers model
(MAP-head image tower, bidirectional text tower pooled at the last position, biased
head) trained with the sigmoid loss computed round the device ring.

The logit bias starts at -log(batch size), the log-odds that a random pair of the batch
is a positive, not SigLIP's -10 (which is that prior for a 32k batch: log 32768 = 10.4).
At -10 a 128 batch's 16,256 negatives pull on the loss ~30x less than its 128 positives
(softmax balances the two 1:1), the bias moves ~0.5 in 500 Adam steps, so the embeddings
only attract and bunch together: held-out shape 17.7% (chance 25%), 29.7% with -log 128.

    python -m clip_jax.main --config=configs/demo_siglip.py --workdir=/tmp/siglip_demo
"""

import importlib.util
import math
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
    # The prior log-odds of a positive pair at this batch size (see the docstring); set at
    # load time, so a --config.train.batch_size override wants its own sigmoid_init_bias.
    c.train.sigmoid_init_bias = -math.log(c.train.batch_size)
    return c
