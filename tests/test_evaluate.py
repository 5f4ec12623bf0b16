"""Evaluation metrics against hand-computed values, and the prompt-ensemble classifier."""

import numpy as np
import pytest

from clip_jax import evaluate


def test_topk_and_ties_resolved_for_the_target():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.7], [0.3, 0.6, 0.6]])
    labels = np.array([0, 1, 2])
    np.testing.assert_array_equal(evaluate.ranks(scores, labels), [0, 1, 0])
    assert evaluate.topk_accuracy(scores, labels, 1) == pytest.approx(2 / 3)
    assert evaluate.topk_accuracy(scores, labels, 2) == 1.0


def test_mean_per_class_recall_weights_classes_equally():
    scores = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0, 0, 1])
    assert evaluate.mean_per_class_recall(scores, labels) == 1.0
    labels = np.array([0, 0, 1, 1])  # class 0: 2/2, class 1: 1/2
    assert evaluate.mean_per_class_recall(scores, labels) == pytest.approx(0.75)


def test_recall_at_k():
    similarity = np.array([[0.1, 0.9, 0.3], [0.8, 0.7, 0.1], [0.2, 0.1, 0.0]])
    out = evaluate.recall_at_k(similarity, np.array([1, 1, 2]), (1, 2))
    assert out == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}


class FakeEncoder:
    """Maps token rows to fixed embeddings, to check the ensembling arithmetic alone."""

    def __init__(self, table):
        self.table = table

    def texts(self, tokens):
        return self.table[tokens[:, 0]]


def test_classifier_weights_are_renormalised_means_of_prompt_embeddings():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(6, 4))
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    tokenizer = lambda texts: np.array([[int(t)] for t in texts])
    weights = evaluate.classifier_weights(FakeEncoder(table), tokenizer, [["0", "1", "2"], ["3", "4"]])
    for row, ids in zip(weights, ([0, 1, 2], [3, 4]), strict=True):
        mean = table[ids].mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-6)
