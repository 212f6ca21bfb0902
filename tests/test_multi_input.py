"""Multi-input models through the validation gate: a data set with one array per input
(`inputs/<tensor name>`), every input fed, permutation importance grouped per input, and
the generated two-input model (testkit/modelgen.make_two_head_model) through register ->
validate -> approve -> release on a real hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from hub import events as ev
from hub.validation import Dataset, DatasetError, ModelError, Policy, load_dataset, validate
from hub.validation.checks import input_feature_groups
from testkit.modelgen import make_two_head_model
from tests.fleet import Fleet

N_A, N_B, ROWS = 5, 3, 120
POLICY = Policy(model_name="duo", task="none", histogram_bins=5, max_flip_rate=1.0)


def two_input_model(tmp: Path, dead_b: bool = False) -> Path:
    """in_a [1, 5] -> out_a [1, 2]; in_b [1, 3] -> out_b [1, 4]. `dead_b`: out_b ignores
    in_b (zero weights), so only in_a's features matter."""
    rng = np.random.default_rng(5)
    w_b = np.zeros((4, N_B)) if dead_b else rng.normal(size=(4, N_B))
    path = tmp / "two-in.tflite"
    path.write_bytes(make_two_head_model(
        [(rng.normal(size=(2, N_A)), rng.normal(size=2)), (w_b, rng.normal(size=4))],
        shared_input=False))
    return path


def inputs(seed: int = 1) -> dict[str, NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return {"in_a": rng.normal(size=(ROWS, N_A)).astype(np.float32),
            "in_b": rng.normal(size=(ROWS, N_B)).astype(np.float32)}


@pytest.mark.timeout(60)
def test_every_input_is_fed_and_importance_is_grouped_per_input(tmp_path: Path) -> None:
    data = tmp_path / "two.npz"
    np.savez(data, **{f"inputs/{k}": v for k, v in inputs().items()})
    dataset = load_dataset(data)
    assert [(p.name, p.row_shape, p.dtype) for p in dataset.parts] == [
        ("in_a", (N_A,), "float32"), ("in_b", (N_B,), "float32")]
    report = validate(two_input_model(tmp_path, dead_b=True), dataset, POLICY)
    assert report.passed, report.failures
    m = report.metrics
    assert m["input_encoding"] == {"in_a": "float", "in_b": "float"}
    assert m["importance_grouping"] == f"in_a=feature:{N_A};in_b=feature:{N_B}"
    importance = m["permutation_importance"]
    assert len(importance) == N_A + N_B
    # in_b reaches no output: its groups change nothing; in_a's do.
    assert importance[N_A:] == [0.0] * N_B and min(importance[:N_A]) > 0
    assert len(report.reference_histograms) == 2 + 4  # both output tensors watched
    # The digest says which columns are which input.
    swapped = Dataset.from_named({"in_a": inputs()["in_b"], "in_b": inputs()["in_a"]})
    assert swapped.digest != dataset.digest


@pytest.mark.timeout(10)
def test_groups_never_mix_inputs_and_share_the_budget() -> None:
    groups, how = input_feature_groups([("a", (8, 8, 3), 0), ("b", (300,), 192)], 128)
    assert how == "a=last_axis:3;b=blocks:64"
    assert len(groups) == 3 + 64
    assert all(g.max() < 192 for g in groups[:3]) and all(g.min() >= 192 for g in groups[3:])
    assert sorted(np.concatenate(groups).tolist()) == list(range(492))
    groups, how = input_feature_groups([("a", (2,), 0), ("b", (3,), 2)], 128)
    assert how == "a=feature:2;b=feature:3" and len(groups) == 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("arrays", "error", "words"), [
    ({"inputs/in_a": np.zeros((4, N_A))}, DatasetError, "missing inputs/in_b"),
    ({"inputs/in_a": np.zeros((4, N_A)), "inputs/in_b": np.zeros((4, N_B)),
      "inputs/in_c": np.zeros((4, 1))}, DatasetError, "inputs/in_c is not an input"),
    ({"inputs/in_a": np.zeros((4, N_A)), "inputs/in_b": np.zeros((4, N_B + 1))},
     DatasetError, "inputs/in_b's rows has shape [4], but the model's input 'in_b' expects [3]"),
    ({"inputs/in_a": np.zeros((4, N_A)), "inputs/in_b": np.zeros((5, N_B))},
     DatasetError, "input 'in_b' has 5 rows, the other inputs have 4"),
    ({"inputs": np.zeros((4, N_A)), "inputs/in_b": np.zeros((4, N_B))},
     DatasetError, "both 'inputs' and"),
    ({"inputs": np.zeros((4, N_A))}, ModelError,
     "the model has 2 inputs (['in_a', 'in_b']); give one array per input"),
])
def test_inputs_that_do_not_match_the_model_are_refused_clearly(
    tmp_path: Path, arrays: dict[str, Any], error: type[Exception], words: str,
) -> None:
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    with pytest.raises(error) as info:
        validate(two_input_model(tmp_path), load_dataset(data), POLICY)
    assert words in str(info.value)


@pytest.mark.timeout(180)
async def test_a_two_input_model_is_registered_validated_approved_and_released(
    fleet: Fleet,
) -> None:
    fleet.config.policy_path.write_text(
        '[default]\ntask = "none"\nhistogram_bins = 5\nmax_flip_rate = 1.0\n'
        'approvals_required = 1\n')
    path = two_input_model(fleet.root)
    data = fleet.root / "two.npz"
    np.savez(data, **{f"inputs/{k}": v for k, v in inputs().items()})
    async with await fleet.client() as admin, \
            await fleet.client(fleet.approver_key) as approver:
        registered = await admin.register_model(path, "duo", "1")
        assert registered["state"] == "registered"
        validated = await admin.validate_model("duo", "1", data)
        assert validated["passed"], validated
        assert validated["metrics"]["input_encoding"] == {"in_a": "float", "in_b": "float"}
        assert len(validated["metrics"]["permutation_importance"]) == N_A + N_B
        await approver.call("model.approve", {"name": "duo", "version": "1"})
        released = await admin.call("model.release", {"name": "duo", "version": "1"})
        assert released["state"] == "released"
    [event] = fleet.feed.of_kind(ev.MODEL_RELEASED)
    assert event.payload["name"] == "duo"
