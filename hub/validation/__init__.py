"""The validation gate: run a model on a validation set and hold it to a policy.

The package's parts: `dataset` (the data), `policy` (the thresholds), `runner` (the
TFLite side), `checks` (what is measured, pure numpy), `gate` (`validate` and the
report), `errors`. The reference histograms and PSI are `hub.telemetry.drift`.

`validate` runs the model with the real TFLite runtime (`edge_agent.runtime`), one row
at a time, and measures quality (accuracy or MAE), the gap of that metric between
groups (fairness), the share of predictions that change under input noise
(robustness), permutation importance per input feature, latency percentiles, and the
reference output histograms whose bin edges go into the release manifest for drift.
The `ValidationReport` says which policy thresholds failed, in sentences a person
can act on; `to_payload()` is the body of the ledger event.

Errors are split by meaning, all under `ValidationError`: `DatasetError` (the
validation data is unusable), `PolicyError` (the policy file is wrong) and
`ModelError` (the model cannot be loaded or run). A model that runs but misses a
threshold is not an error: it is a report with `passed=False`.

Policy file (TOML); `[models.<name>]` overrides `[default]` key by key:

    [default]
    task = "classification"        # or "regression"
    min_accuracy = 0.90            # classification only
    max_group_gap = 0.10           # largest accuracy (or MAE) difference between groups
    max_flip_rate = 0.05           # share of predictions changed by input noise
    noise_std = 0.05               # noise std, relative to each feature's std
    max_p95_latency_ms = 5.0       # measured on the hub, a sanity bound only
    histogram_bins = 10
    approvals_required = 1

    [models.kws]
    min_accuracy = 0.95

    [models."energy-forecast"]
    task = "regression"
    max_mae = 0.3                  # regression only

The validation data (.npz) holds `inputs` (one-input models) or one `inputs/<tensor
name>` array per input (several), optional `labels`, `groups`, `sequences`; the format
is in docs/PROTOCOL.md ("Validation data set").

A threshold that does not apply to the model's task is refused in the model's own
table and ignored when inherited from `[default]`.
"""

from __future__ import annotations

from hub.validation.dataset import Dataset, load_dataset
from hub.validation.errors import DatasetError, ModelError, PolicyError, ValidationError
from hub.validation.gate import ValidationReport, validate
from hub.validation.policy import Policy, load_policy

__all__ = [
    "Dataset",
    "DatasetError",
    "ModelError",
    "Policy",
    "PolicyError",
    "ValidationError",
    "ValidationReport",
    "load_dataset",
    "load_policy",
    "validate",
]
