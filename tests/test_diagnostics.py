"""The scenes diagnostic suite: probe captions differ in exactly the tested respect."""

import numpy as np

from clip_jax import diagnostics
from clip_jax.data import scenes


def test_relation_follows_image_coordinates():
    a = scenes.Thing("red", "circle", "small", (0.2, 0.5))
    assert diagnostics.relation(a, scenes.Thing("blue", "bar", "small", (0.8, 0.5))) == "to the left of"
    assert (
        diagnostics.relation(a, scenes.Thing("blue", "bar", "small", (0.2, 0.9))) == "above"
    )  # y grows down
    assert diagnostics.relation(a, scenes.Thing("blue", "bar", "small", (0.25, 0.1))) == "below"


def test_probes_are_deterministic_and_differ_as_named():
    spatial = diagnostics.make_probes("spatial", 12, 40, seed=3)
    again = diagnostics.make_probes("spatial", 12, 40, seed=3)
    np.testing.assert_array_equal(spatial["image"], again["image"])
    for true, false, group in zip(spatial["true"], spatial["false"], spatial["group"], strict=True):
        relation = next(r for r, slug in diagnostics.RELATION_SLUGS.items() if slug == group)
        assert f" {relation} " in true and f" {scenes.RELATIONS[relation][0]} " in false
        assert true.split(f" {relation} ") == false.split(f" {scenes.RELATIONS[relation][0]} ")
    binding = diagnostics.make_probes("binding", 8, 40)
    for true, false in zip(binding["true"], binding["false"], strict=True):
        assert true != false and sorted(true.split()) == sorted(false.split())  # same words, colours moved
    size = diagnostics.make_probes("size", 8, 40)
    for true, false in zip(size["true"], size["false"], strict=True):
        assert {true.split()[1], false.split()[1]} == {"small", "large"}


def test_pairwise_accuracy_counts_ties_half():
    image = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    true = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    false = np.array([[0.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    np.testing.assert_array_equal(diagnostics.pairwise_accuracy(image, true, false), [1.0, 0.0, 0.5])
