"""The towers' last block computes only the row each tower pools (`layers.ResidualBlock`
with ``rows``), checked against the same block and towers computing every row."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scan_layout

from clip_jax.models import clip, layers

ROWS = jnp.array([0, 4, 6, 2])  # one per example: first, middle, last of 7, another


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [False, True])
def test_attend_at_query_positions_equals_those_rows_of_full_attention(causal):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (4, 7, 3, 8)) for key in (kq, kk, kv))
    full = layers.attend(q, k, v, causal)
    take = lambda x: layers.take_rows(x.reshape(4, 7, -1), ROWS).reshape(4, 1, 3, 8)
    ours = layers.attend(take(q), k, v, causal, ROWS[:, None])
    _close(ours, take(full), 1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_block_at_rows_equals_those_rows_of_the_full_block(causal):
    block = layers.ResidualBlock(2, 4.0, "quick_gelu", num_layers=2, causal=causal)
    x = jax.random.normal(jax.random.key(1), (4, 7, 16))
    params = nn.meta.unbox(block.init(jax.random.key(2), x)["params"])
    weights = jax.random.normal(jax.random.key(3), (4, 1, 16))

    def loss(p, x, rows):
        out = block.apply({"params": p}, x, rows)
        out = out if rows is not None else layers.take_rows(out, ROWS)
        return jnp.sum(out * weights), out

    (ref_loss, ref_out), ref_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x, None)
    (our_loss, our_out), our_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x, ROWS)
    assert our_out.shape == (4, 1, 16)
    _close(our_out, ref_out, 1e-5)
    _close(our_loss, ref_loss, 1e-5)
    _close(our_grads, ref_grads, 1e-5)  # parameters and input: every row's keys and values count


@pytest.mark.parametrize("variant", ["tiny", "tiny-siglip"])  # class token + EOT; MAP head + last position
def test_towers_equal_the_scanned_towers_which_compute_every_row(variant):
    """``scan`` runs the last block on every row and takes the pooled one after: the
    reference. Texts of different lengths, an all-pad one included, pool different rows."""
    config = clip.get_variant(variant)
    unrolled, scanned = clip.CLIP(config), clip.CLIP(config, scan=True)
    images, _ = clip.dummy_inputs(config, 4)
    images = jax.random.normal(jax.random.key(4), images.shape)
    length = config.text.context_length
    tokens = jax.random.randint(jax.random.key(5), (4, length), 1, config.text.vocab_size)
    tokens = jnp.where(jnp.arange(length) < jnp.array([[3], [length], [0], [9]]), tokens, 0)
    params = nn.meta.unbox(unrolled.init(jax.random.key(0), images, tokens)["params"])

    def loss(model, p):
        image, text, scale, _ = model.apply({"params": p}, images, tokens)
        return jnp.sum(image @ text.T) * scale + jnp.sum(text * jnp.arange(text.shape[1])), (image, text)

    run = lambda model, p: jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))(p)
    (ours, our_emb), our_grads = run(unrolled, params)
    (ref, ref_emb), ref_grads = run(scanned, scan_layout.stacked(params))
    _close(ours, ref, 1e-5)
    _close(our_emb, ref_emb, 1e-5)
    ref_grads = layers.unstack_layers(ref_grads)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), our_grads, ref_grads)
    assert max(jax.tree.leaves(diff)) < 1e-5 * scale


@pytest.mark.parametrize("variant", ["tiny", "tiny-siglip"])
def test_last_blocks_execute_only_the_pooled_rows(variant):
    """XLA's FLOP count of the forward, and the model FLOPs formula, are the full count
    (24 n d^2 + 4 n^2 d per block) less what the last blocks skip: of their n rows, all but
    one for the query, output and MLP projections (2 x (1 + 1 + 2 x 4) d^2 per row) and
    for the attention (2 x 2 n d per row). SigLIP's image tower pools every row (MAP head)."""
    config = clip.get_variant(variant)
    vision, text = config.vision, config.text
    towers = [(text.context_length, text.width, text.layers)]
    full = 0.0
    for n, d, depth in [(vision.num_positions, vision.width, vision.layers), *towers]:
        full += depth * (24 * n * d * d + 4 * n * n * d)
    skipped = sum((n - 1) * (20 * d * d + 4 * n * d) for n, d, _ in towers)
    if vision.pooling == "class_token":
        n, d = vision.num_positions, vision.width
        skipped += (n - 1) * (20 * d * d + 4 * n * d)
    rest = 2 * vision.num_patches * 3 * vision.patch_size**2 * vision.width
    rest += 2 * config.embed_dim * (vision.width + text.width)
    want = full - skipped + rest
    assert clip.forward_flops_per_pair(config) == pytest.approx(want, rel=1e-12)
    model = clip.CLIP(config)
    images, tokens = clip.dummy_inputs(config, 8)
    params = model.init(jax.random.key(0), images, tokens)
    cost = jax.jit(model.apply).lower(params, images, tokens).compile().cost_analysis()
    executed = (cost[0] if isinstance(cost, list) else cost)["flops"]
    if vision.pooling == "map":  # the MAP head, outside the formula: one query over the n rows
        n, d = vision.num_positions, vision.width
        want += 4 * d * d + 4 * n * d * d + 4 * n * d + 4 * d * vision.mlp_hidden
    assert executed == pytest.approx(want * 8, rel=0.03)  # plus the norms, softmax, activations
    assert skipped > 0.05 * full  # so the 3% tolerance tells the two counts apart
