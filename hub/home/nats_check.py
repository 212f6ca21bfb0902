"""Checking an identity change before and after the NATS server takes it.

A users file nats-server refuses (a duplicate nkey, a syntax error) leaves the running
server on its old users after a reload, and a server that is restarted with it does not
start. So the hub

- checks the new users file with `nats-server -t` (the server's own config test, on the
  server configuration with the new file in place of users.conf) before writing it in
  place, when the nats-server binary is here (beside the interpreter, else on PATH; a
  hub without it writes unchecked and logs so once);
- puts a reload probe in every users file it writes: a user with a fresh nkey and no
  rights at all. After the reload it connects as that user: the server accepting it
  proves it runs this very file. If it does not within RELOAD_CONFIRM_SECONDS, the
  change that asked for the reload is answered with an error, not "reloaded".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edge_agent.transport.connect import NatsAuth, nkey_public, nkey_seed
from edge_agent.transport.connect import connect as nats_connect
from hub.errors import Refused
from ledger.signing import SigningKey

log = logging.getLogger(__name__)

RELOAD_CONFIRM_SECONDS = 5.0
CHECK_TIMEOUT_SECONDS = 20.0
PROBE_MARK = "# reload probe"


class NatsUsersRefused(Refused):
    """nats-server refuses the new users file; the old one was left in place."""


class NatsReloadUnconfirmed(Refused):
    """The NATS server did not take the new users file after the reload."""


def nats_server_binary() -> str | None:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


_warned = False


def check_users_text(server_conf: Path, users_name: str, text: str) -> None:
    """Raise NatsUsersRefused if nats-server refuses its configuration `server_conf` with
    `text` as the users file it includes (`include users_name`)."""
    global _warned
    binary = nats_server_binary()
    if binary is None:
        if not _warned:
            _warned = True
            log.warning("nats-server is not installed here: users files are not checked "
                        "before they are written")
        return
    directory = server_conf.parent
    # Names of this check alone: two hub processes on one home (a leader and a standby),
    # or two threads of one, may check at once, and one must not remove the other's files.
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    candidate = directory / f"{users_name}.{token}.check"
    check_conf = directory / f"{server_conf.name}.{token}.check"
    try:
        conf = server_conf.read_text()
    except OSError:
        conf = f"include {users_name}\n"
    conf = conf.replace(f"include {users_name}", f"include {json.dumps(candidate.name)}")
    try:
        candidate.write_text(text)
        candidate.chmod(0o600)
        check_conf.write_text(conf)
        check_conf.chmod(0o600)
        done = subprocess.run([binary, "-t", "-c", str(check_conf)], capture_output=True,
                              text=True, timeout=CHECK_TIMEOUT_SECONDS, check=False)
    finally:
        for path in (candidate, check_conf):
            with contextlib.suppress(OSError):
                path.unlink()
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        reason = said[-1] if said else f"exit code {done.returncode}"
        reason = reason.replace(f"{candidate.name}", users_name)
        raise NatsUsersRefused(f"nats-server refuses the new NATS users file ({reason}); "
                               f"{users_name} was left as it was")


def new_probe() -> tuple[str, str]:
    """(nkey seed, users-file block) of a fresh reload probe with no rights."""
    key = SigningKey.generate()
    block = (f"    {PROBE_MARK}\n    {{ nkey: {json.dumps(nkey_public(key.public.raw))},\n"
             "      permissions: { publish: { deny: [\">\"] }, subscribe: { deny: [\">\"] } } }")
    return nkey_seed(key.private_raw()), block


def without_probe(text: str) -> str:
    """A users file's text without its reload probe (to compare two files)."""
    head, mark, rest = text.partition(f"    {PROBE_MARK}\n")
    if not mark:
        return text
    _, _, tail = rest.partition("} } }")
    return head + tail


async def _quiet(exc: Exception) -> None:
    """nats-py prints every failed attempt; the probe says one line in the end."""


def confirm_reload(url: str, seed: str, ca_file: Path | None,
                   timeout: float = RELOAD_CONFIRM_SECONDS) -> None:
    """Connect as the probe of the file just written; NatsReloadUnconfirmed if the
    server does not let it in within `timeout` seconds."""
    async def probe() -> str | None:
        deadline = time.monotonic() + timeout
        error = "no answer"
        while time.monotonic() < deadline:
            try:
                nc = await nats_connect(url, NatsAuth(nkey_seed=seed, ca_file=ca_file),
                                        retry_for=0, connect_timeout=1,
                                        allow_reconnect=False, max_reconnect_attempts=0,
                                        name="hub-reload-probe", error_cb=_quiet)
            except Exception as exc:
                error = str(exc) or type(exc).__name__
                await asyncio.sleep(0.1)
                continue
            with contextlib.suppress(Exception):
                await nc.close()
            return None
        return error

    error = asyncio.run(probe())
    if error is not None:
        raise NatsReloadUnconfirmed(
            f"the NATS server did not take the new users file within {timeout:.0f} s "
            f"({error[:200]}): the ledger has the change but NATS identities do not; see "
            "the server's log, fix it, and restart the hub (it rewrites and reloads at start)")
