"""The ledger's exceptions, split by meaning.

* `EntryError`: an entry's fields or bytes are malformed (the *data* is bad).
* `StoreError`: the database could not be opened, read or written (the *storage*
  failed); `LedgerNotFoundError` is the common "wrong path" case.

Chain damage found by verification is not an exception: it is a `VerifyResult`
that names the first bad seq, because finding damage is a normal outcome of an audit.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error raised by the ledger package."""


class EntryError(LedgerError, ValueError):
    """An entry's fields are invalid, or its stored body cannot be read as an entry."""


class StoreError(LedgerError):
    """The ledger database could not be opened, read or written."""


class LedgerNotFoundError(StoreError):
    """No ledger database exists at the given location (and creating one was not asked)."""
