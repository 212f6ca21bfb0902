"""The agent's errors, split by meaning (the python-tuf way).

    AgentError
      UpdateRefused        the data is bad or untrusted: refuse it, report it, no retry
        ProtocolError      a message is malformed, of the wrong type or too large
        TrustError         a signature, threshold, role or expiry check failed
                           (RootRotationError, edge_agent.trust.chain: a newer root refused)
        DigestMismatch     the blob's BLAKE3 digest is not the manifest's
        BlobTooLarge       the blob holds more bytes than the manifest states
        InclusionRefused   the transparency proof does not hold
      TransferError        the transfer failed: retrying may help
        FetchError         a blob or document could not be read (network, missing object)
        NotPublished       a bucket or key is not there (yet)
        InclusionPending   no transparency proof yet: wait
      DiskFull             no room on the device's disk for the update: retried later
      DeviceBundleError    the device bundle directory is missing or invalid
      ModelRuntimeError    the model does not load or run
      InferenceError       a call through the local inference API failed (edge_agent.serving)
        InputRejected      the agent refused the request (bad frame, op, dtype, shape...)
        NoModelLoaded      no model is installed on the device yet
        ModelFailed        the model ran and failed (the runtime raised)
        AgentUnreachable   no agent answers on the socket, or the connection broke

The agent refuses with one `except UpdateRefused` and retries with one
`except TransferError`. `ProtocolError`, `TrustError` and `DeviceBundleError` stay
`ValueError`s: the hub and older callers catch them as such.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.protocol.documents import Assignment


class AgentError(Exception):
    """Root of every error the edge agent raises on purpose."""


class UpdateRefused(AgentError):
    """The update's data is bad or untrusted; retrying the same assignment won't help.

    `assignment` is set when the refused assignment itself is authentic and for this
    device (its fields then go into the failure report).
    """

    def __init__(self, reason: str, assignment: Assignment | None = None) -> None:
        super().__init__(reason)
        self.assignment = assignment


class ProtocolError(UpdateRefused, ValueError):
    """A message is malformed, of the wrong type, or too large. `reason` names the class
    of refusal for counters (the hub counts refused reports by it): "malformed" (not a
    document of the protocol), "bounds" (a field past a bound of docs/PROTOCOL.md
    "Bounds"), "oversized" (more bytes than the message may have)."""

    reason: str = "malformed"

    def __init__(self, message: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TrustError(UpdateRefused, ValueError):
    """A document is not trusted: bad/missing signatures, below threshold, expired."""


class StaleAuthority(TrustError):
    """No unexpired timestamp names the trust root this device holds (a freeze, a
    withheld rotation, a replayed or forged timestamp): nothing new is installed until
    fresh authority comes; the installed model keeps running and nothing is recorded
    (the assignment is tried again later, not remembered as handled). `kind` names the
    reason without its numbers (`missing`, `refused`, `replayed`, `expired`, `future`,
    `root_newer`, `root_older`, `root_digest`): the agent reports each kind once."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class DigestMismatch(UpdateRefused):
    """The complete blob's BLAKE3 digest is not the one the signed manifest states."""


class BlobTooLarge(UpdateRefused):
    """The object holds more bytes than the manifest states: the data is bad."""


class InclusionRefused(UpdateRefused):
    """The transparency proof is there but does not hold: never install this release."""


class TransferError(AgentError):
    """The transfer failed (network, timeout, missing object); retrying may help."""


class FetchError(TransferError):
    """A blob or document could not be read."""


class NotPublished(TransferError):
    """The bucket or key is not there (yet): the hub has not published it."""


class InclusionPending(TransferError):
    """No proof yet (the release is not witnessed yet, or the root names no witnesses)."""


class DiskFull(AgentError):
    """The update does not fit on the device's disk (the pre-check, or ENOSPC while
    writing); the partial download is removed and the update is tried again later."""


class DeviceBundleError(AgentError, ValueError):
    """The device bundle directory is missing, incomplete or invalid."""


class ModelRuntimeError(AgentError):
    """A model could not be loaded or run; the message says why."""


class InferenceError(AgentError):
    """A call through the local inference API failed (edge_agent.serving).

    `code` is the protocol's error code (docs/PROTOCOL.md, "Local inference API"),
    empty when the call never got an answer.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class InputRejected(InferenceError):
    """The agent refused the request: unknown op, malformed or oversized frame, an input
    of the wrong dtype or shape, a missing or unknown input, non-finite values."""


class NoModelLoaded(InferenceError):
    """The agent runs but has no model installed (yet)."""


class ModelFailed(InferenceError):
    """The model ran on valid inputs and the runtime reported a failure."""


class AgentUnreachable(InferenceError):
    """Nothing answers on the socket, or the connection broke mid-call."""
