"""The ledger's exceptions, split by meaning.

* `EncodingError`: a value cannot be encoded canonically, or bytes are not canonical.
* `KeyFileError`: a key file or key bytes are unusable.
* `EntryError`: an entry's fields or bytes are malformed (the *data* is bad).
* `StoreError`: the database could not be opened, read or written (the *storage*
  failed); `LedgerNotFoundError` is the common "wrong path" case.
* `ProofError`: a Merkle inclusion or consistency proof does not verify.
* `TreeRangeError`: a tree size, leaf index or seq asked about is out of range
  (e.g. a proof for an entry the tree of that size does not contain).
* `NoteError` / `CheckpointError`: a signed note or checkpoint is malformed or a
  signature from a trusted key fails; `UnverifiedNoteError`: no trusted key signed it.
* `ExportError` / `BundleError`: an export file or a proof bundle is malformed or
  does not verify.
* `WitnessError`: a witness refused a checkpoint (with both notes when it is evidence
  of a fork or rollback); `WitnessStateError`: the witness's state file is unusable;
  `ForkDetected`: a running witness was shown two histories, and stops.

Chain damage found by verification is not an exception: it is a `VerifyResult`
that names the first bad seq, because finding damage is a normal outcome of an audit.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error raised by the ledger package."""


class EncodingError(LedgerError, ValueError):
    """The value cannot be encoded canonically, or the bytes are not canonical."""


class KeyFileError(LedgerError, ValueError):
    """A key file or key bytes are unusable."""


class EntryError(LedgerError, ValueError):
    """An entry's fields are invalid, or its stored body cannot be read as an entry."""


class StoreError(LedgerError):
    """The ledger database could not be opened, read or written."""


class LedgerNotFoundError(StoreError):
    """No ledger database exists at the given location (and creating one was not asked)."""


class ProofError(LedgerError):
    """A Merkle inclusion or consistency proof does not verify (the *proof* is bad)."""


class TreeRangeError(LedgerError, ValueError):
    """A Merkle tree size, leaf index or seq is out of range for the request."""


# -- signed notes, checkpoints, witnesses (ledger/note.py, checkpoint.py, witness.py) --


class NoteError(LedgerError, ValueError):
    """A signed note, key string or signature is malformed, or a signature from a known
    key does not verify (the *note* is bad)."""


class UnverifiedNoteError(NoteError):
    """A well-formed note has no signature from any key the caller trusts.

    `note` is the parsed note (every signature in `note.unverified_sigs`), for display.
    """

    def __init__(self, message: str, note: object) -> None:
        super().__init__(message)
        self.note = note


class CheckpointError(NoteError):
    """A checkpoint's text is not a strict C2SP tlog-checkpoint, or it is not signed by
    the expected log key for the expected origin."""


class WitnessError(LedgerError):
    """A witness refused to cosign a checkpoint.

    When the refusal is evidence against the log (a fork: two checkpoints of one log
    that cannot both be true, or a rollback) `old_note` is the checkpoint this witness
    accepted before and `new_note` the one it refused, both exactly as signed; `str()`
    prints both so they can be handed to an auditor.
    """

    def __init__(
        self, message: str, old_note: bytes | None = None, new_note: bytes | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.old_note = old_note
        self.new_note = new_note

    @property
    def evidence(self) -> tuple[bytes, bytes] | None:
        if self.old_note is None or self.new_note is None:
            return None
        return (self.old_note, self.new_note)

    def __str__(self) -> str:
        if self.evidence is None:
            return self.message
        old = self.evidence[0].decode("utf-8", "replace")
        new = self.evidence[1].decode("utf-8", "replace")
        return (
            f"{self.message}\n"
            f"--- checkpoint accepted before ---\n{old}"
            f"--- checkpoint refused now ---\n{new}"
        )


class StaleCheckpoint(WitnessError):
    """An old checkpoint, consistent with (a prefix of) the one the witness cosigned
    last: nothing to cosign and nothing wrong (a replayed or redelivered message)."""


class ForkDetected(LedgerError):
    """The log showed this witness two histories; `error` carries both notes."""

    def __init__(self, error: WitnessError) -> None:
        super().__init__(str(error))
        self.error = error


class LogKeyLost(LedgerError):
    """A witness got a checkpoint signed by no log key it trusts and could not learn the
    new key from the trust roots recorded in the log (it stops rather than fall silent)."""


class WitnessStateError(LedgerError):
    """The witness's state file could not be read or written, or is corrupt. A witness
    must stop rather than forget what it cosigned, so this is never ignored."""


class ExportError(LedgerError):
    """An export file (ledger/export.py) is malformed or cannot be read or written."""


class BundleError(LedgerError):
    """A proof bundle (ledger/bundle.py) is malformed or does not verify; the message
    says which check failed."""
