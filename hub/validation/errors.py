"""The validation gate's errors, split by meaning (its own module so that the dataset,
policy and runner modules can raise them without importing the gate)."""

from __future__ import annotations

from hub.errors import Refused


class ValidationError(Refused):
    """Validation could not run; the message says what to fix."""


class DatasetError(ValidationError):
    """The validation data is unusable (missing arrays, bad shapes, NaN, too big)."""


class PolicyError(ValidationError):
    """The policy file is unreadable or says something invalid."""


class ModelError(ValidationError):
    """The model cannot be loaded or run, or has a shape validation does not support."""
