"""An evaluator's options (`clip_jax.eval.evaluator.options`), as the zero-shot, retrieval and
validation-loss evaluators' ``from_config`` read them: from a ConfigDict, a dict, or any object
with attributes, an unset option None (the evaluator's default then)."""

import types

import pytest
from ml_collections import ConfigDict

from clip_jax import cli
from clip_jax.eval import classify, evaluator, retrieve, val_loss

KINDS = {
    "dict": dict,
    "ConfigDict": ConfigDict,
    "attributes": lambda d: types.SimpleNamespace(**d),
}


@pytest.mark.parametrize("kind", KINDS)
def test_options_reads_set_and_unset_keys(kind):
    get = evaluator.options(KINDS[kind]({"dataset": "wds:/d", "every": 5, "ks": [1, 2]}))
    assert (get("dataset"), get("every"), get("ks")) == ("wds:/d", 5, [1, 2])
    assert get("limit") is None


@pytest.mark.parametrize("kind", KINDS)
def test_the_evaluators_read_their_sections_alike(kind):
    wrap = KINDS[kind]
    z = classify.ZeroShotEvaluator.from_config(
        "z", wrap({"dataset": "folder:/d", "every": 3, "label_key": "y", "templates": "t.txt"}), 32
    )
    assert z == classify.ZeroShotEvaluator("z", "folder:/d", 32, 3, "t.txt", None, "y", None, None)
    r = retrieve.RetrievalEvaluator.from_config("r", wrap({"dataset": "array_record:/a-*", "ks": [1, 2]}), 32)
    assert r == retrieve.RetrievalEvaluator("r", "array_record:/a-*", 32, 0, None, (1, 2))
    v = val_loss.ValLossEvaluator.from_config("v", wrap({"dataset": "wds:/v", "limit": 7, "every": 4}), 32)
    assert v == val_loss.ValLossEvaluator("v", "wds:/v", 32, 4, 7)


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_dataset_is_one_clear_error(kind):
    with pytest.raises(cli.UserError, match=r"config.eval.evaluators.z.dataset is not set"):
        classify.ZeroShotEvaluator.from_config("z", KINDS[kind]({"every": 1}), 32)
    for cls in (retrieve.RetrievalEvaluator, val_loss.ValLossEvaluator):
        with pytest.raises(cli.UserError, match=r"config.eval.evaluators.x.dataset=None: "):
            cls.from_config("x", KINDS[kind]({"every": 1}), 32)
