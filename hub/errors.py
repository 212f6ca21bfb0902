"""Every error the hub raises, as one hierarchy with the CLI's exit code on it.

The split is by what a person does next, the way python-tuf splits "the data is bad" from
"the transfer failed":

- `Refused` (exit 1): the input or the state is wrong (a lifecycle rule, a role, a
  signature, a bad argument the hub checked). Repeating it changes nothing; the message
  says what would.
- `UsageError` (exit 2): the command's own set-up is wrong (home, config, key file).
- `Unreachable` (exit 3): NATS or the hub could not be reached or did not answer in
  time. Retrying later may work.

The CLI catches `HubError` once and exits with `exc.exit_code`; nothing picks an exit code
by reading a message. Capability modules subclass `Refused` with a name that says which
rule refused (`TransitionRefused`, `KeyChangeRefused`, ...), so the router catches one type.
"""

from __future__ import annotations

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TASK_FAILED = 4  # `hub serve`: a critical task cannot work (ledger.supervisor)


class HubError(Exception):
    """Root of every hub error; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_REFUSED


class Refused(HubError):
    """The input or the current state does not allow this (not retried)."""

    exit_code = EXIT_REFUSED


class UsageError(HubError):
    """The caller's own set-up is wrong: home directory, config, key file, arguments."""

    exit_code = EXIT_USAGE


class Unreachable(HubError):
    """NATS or the hub could not be reached, or did not answer in time."""

    exit_code = EXIT_UNREACHABLE
