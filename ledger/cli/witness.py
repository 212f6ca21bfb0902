"""`ledger witness-key` and `ledger witness`: run an independent checkpoint witness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import typer

from ledger.cli._common import (
    EXIT_DAMAGED,
    EXIT_OK,
    EXIT_USAGE,
    LOG_KEY_HELP,
    NATS_CA,
    NATS_PASSWORD_FILE,
    NATS_USER,
    fail,
    log_key,
    nats_login,
)
from ledger.errors import ForkDetected, KeyFileError, LedgerError, LogKeyLost, NoteError
from ledger.logs import LOG_FORMAT_HELP, configure_logging
from ledger.merkle import HASHES
from ledger.note import CosignatureSigner
from ledger.retry import Stopped
from ledger.signing import SigningKey
from ledger.supervisor import Supervisor


def witness_key(
    out: Path = typer.Option(..., "--out", help="Where to write the new key (0600)."),
    name: str = typer.Option(..., "--name", help="The witness's key name, e.g. "
                             "witness.example/w1 (no spaces, no '+')."),
) -> None:
    """Make a witness key; print its cosignature verifier key (vkey), which the hub
    lists in HOME/witnesses and verifiers pass as --witness-key. Also writes OUT.vkey."""
    if out.exists():
        fail(f"{out} exists; not overwriting a key", EXIT_USAGE)
    key = SigningKey.generate()
    try:
        vkey = CosignatureSigner.from_signing_key(name, key).vkey()
    except NoteError as exc:
        fail(str(exc), EXIT_USAGE)
    key.save(out)
    out.with_name(out.name + ".vkey").write_text(vkey + "\n")
    typer.echo(vkey)


def witness(
    nats_url: str = typer.Option(..., "--nats", help="NATS URL of the hub's server."),
    log_vkey: str = typer.Option(..., "--log-vkey", "--log-key", help=LOG_KEY_HELP,
                                 metavar="VKEY"),
    key: Path = typer.Option(..., "--key", help="This witness's key (`ledger witness-key`)."),
    name: str = typer.Option(..., "--name", help="This witness's key name."),
    state: Path = typer.Option(..., "--state", help="JSON file remembering the last "
                               "checkpoint cosigned per log (created if missing)."),
    once: bool = typer.Option(False, "--once", help="Cosign the latest checkpoint, then exit."),
    merkle_hash: str | None = typer.Option(
        None, "--merkle-hash", help="Pin the log's tree hash (blake3 or sha256); default: "
        "as the hub says."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the hub."),
    nats_user: str | None = NATS_USER,
    nats_password_file: Path | None = NATS_PASSWORD_FILE,
    nats_ca: Path | None = NATS_CA,
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    log_format: str = typer.Option("auto", "--log-format", help=LOG_FORMAT_HELP),
) -> None:
    """Witness a hub's checkpoints: cosign each one that is consistent with the last one
    this witness cosigned (RFC 9162 consistency proof from the hub), and send the
    cosignature back. A fork or rollback is refused: both signed notes are printed and
    the witness exits 1. Runs until SIGTERM/Ctrl-C (exit 0, also while still
    connecting), retrying NATS for ever with exponential backoff (one log line per
    attempt); or once with --once (exit 0 when cosigned, 1 when refused, 2 when it
    could not run)."""
    from ledger.net.remote import LedgerClient
    from ledger.net.witness_runner import WitnessRunner
    from ledger.witness import Witness, WitnessState

    try:
        configure_logging(log_level, log_format)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    log = log_key(log_vkey, "witness")
    login = nats_login(nats_user, nats_password_file, nats_ca)
    if merkle_hash is not None and merkle_hash not in HASHES:
        fail(f"--merkle-hash must be one of {', '.join(HASHES)}", EXIT_USAGE)
    try:
        witness_signing_key = SigningKey.load(key)
        w = Witness(name, witness_signing_key, {log.name: log}, WitnessState(state))
    except (KeyFileError, LedgerError) as exc:
        fail(str(exc), EXIT_USAGE)

    def say(line: str) -> None:
        typer.echo(line)
        sys.stdout.flush()

    async def run() -> int:
        if once:
            client = await LedgerClient.connect(nats_url, timeout=timeout,
                                                name=f"witness {name}", login=login)
            try:
                runner = WitnessRunner(w, client, say, HASHES.get(merkle_hash or ""))
                return EXIT_OK if await runner.once() else EXIT_DAMAGED
            finally:
                await client.close()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before connecting: SIGTERM works there
            loop.add_signal_handler(sig, stop.set)
        try:  # NATS down or refusing this witness: one log line per attempt, for ever
            client = await LedgerClient.connect_for_good(
                nats_url, timeout=timeout, name=f"witness {name}", login=login, stop=stop)
        except Stopped:
            return EXIT_OK
        runner = WitnessRunner(w, client, say, HASHES.get(merkle_hash or ""))
        # Following runs under the supervisor: an unexpected error is logged once and
        # the follower restarts with backoff (it catches up from the hub's latest
        # checkpoint); a fork or a lost log key is evidence and stops the witness.
        supervisor = Supervisor(logging.getLogger("ledger.witness"),
                                fatal_errors=(ForkDetected, LogKeyLost))
        announced = False

        def ready() -> None:
            nonlocal announced
            if not announced:
                announced = True
                typer.echo(f"witness {name} following {log.name} on {nats_url}", err=True)

        try:
            supervisor.start("follow", lambda: runner.follow(ready))
            stopped = asyncio.create_task(stop.wait())
            fatal = asyncio.create_task(supervisor.fatal.wait())
            await asyncio.wait({stopped, fatal}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            fatal.cancel()
            if supervisor.fatal_error is not None:
                raise supervisor.fatal_error
            if supervisor.fatal.is_set():
                fail(f"witness cannot work: {supervisor.fatal_reason}", EXIT_DAMAGED)
            return EXIT_OK
        finally:
            await supervisor.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2)

    try:
        code = asyncio.run(run())
    except ForkDetected as exc:
        say(str(exc.error))
        raise typer.Exit(EXIT_DAMAGED) from None
    except LedgerError as exc:
        fail(str(exc), EXIT_USAGE)
    raise typer.Exit(code)
