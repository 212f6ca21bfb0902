"""Enrolment: `device.enroll` / `device.revoke`, the device key and the device bundle.

`hub device enroll ID` makes an Ed25519 key for the device, records its public half in
the `device.enrolled` event (`public`), and writes the bundle the device is set up from:

    HOME/devices/ID/device.toml     device_id, nats_url, file names (see BUNDLE_FIELDS)
    HOME/devices/ID/device.key      the device's private key (0600)
    HOME/devices/ID/trust-root.bin  the newest trust root, pinned by the device
    HOME/devices/ID/ca.pem          the NATS server's CA certificate (homes made with --tls)

The device key is also the device's NATS identity (an nkey; edge_agent/transport/connect.py):
enrolment adds the device's user to the NATS server's users file, revocation removes it
(hub.home.nats_users).

`edge-agent run --bundle DIR` reads it (edge_agent/bundle.py). The format is a flat TOML
table; readers ignore keys they do not know, so more files (NATS credentials) can be
added later. A device that keeps its key elsewhere (a secure element) enrolls with
`--public HEX` and gets a bundle without device.key; a device that makes its own key
enrols itself with a one-time token (hub/devices/tokens.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from edge_agent import protocol as proto
from edge_agent.bundle import (
    BUNDLE_FORMAT,
    CA_NAME,
    DEVICE_KEY_NAME,
    DEVICE_TOML,
    TRUST_ROOT_NAME,
)
from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Effects, Outcome, Verbs, command_event
from hub.devices import state as device_state
from hub.devices.state import REVOKED
from hub.home.config import HubConfig, toml_str
from hub.home.nats_config import ca_path
from hub.home.nats_users import identity_holder
from ledger.signing import PublicKey, SigningKey


class EnrolmentCommands:
    def __init__(self, config: HubConfig, effects: Effects) -> None:
        self.config = config
        self.effects = effects

    def handlers(self) -> Verbs:
        return Verbs(writes={"device.enroll": self.enroll, "device.revoke": self.revoke})

    def enroll(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        device = Body(cmd.body).text("device")
        proto.check_device_id(device)
        if device_state.get_device(conn, device) is not None:
            raise CommandError(f"device {device} is already enrolled")
        # The device's own key signs its status reports. Made here unless the device
        # brings its public key; the bundle is written before the ledger names the key.
        public = cmd.body.get("public")
        key = None
        if public is None:
            key = SigningKey.generate()
            public = key.public.raw
        elif not isinstance(public, bytes) or len(public) != 32:
            raise CommandError("'public' must be a 32-byte Ed25519 public key")
        elif (holder := identity_holder(conn, public)) is not None:
            raise CommandError(f"key {PublicKey(public).keyid} is already the key of {holder}: "
                               "every device needs a key of its own")
        bundle = write_bundle(self.config, device, key)
        event = command_event(cmd, ev.DEVICE_ENROLLED, ev.device_subject(device),
                              {"device": device, "public": public})
        result = {"device": device, "bundle": str(bundle), "keyid": PublicKey(public).keyid}

        # Answered once the server has the device's NATS user (the reload settled): the
        # device can connect right away, and nobody's next connect overlaps that reload.
        # Enrolments in flight together share one rewrite and reload (NatsUsersSync).
        async def let_in() -> None:
            await self.effects.sync_nats_users(wait=True)

        return Outcome([event], result, [let_in])

    def revoke(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        """Shut a device out: its NATS user goes; its reports are refused from now on."""
        device = Body(cmd.body).text("device")
        row = device_state.get_device(conn, device)
        if row is None:
            raise CommandError(f"no device {device} is enrolled")
        if row["state"] == REVOKED:
            raise CommandError(f"device {device} is already revoked")
        reason = cmd.body.get("reason", "")
        if not isinstance(reason, str):
            raise CommandError("'reason' must be text")
        event = command_event(cmd, ev.DEVICE_REVOKED, ev.device_subject(device),
                              {"device": device, "reason": reason})
        result: dict[str, Any] = {"device": device}

        async def shut_out() -> None:  # before the reply: the device is out when it comes
            result["reloaded"] = await self.effects.sync_nats_users(wait=True)
        return Outcome([event], result, [shut_out])


def bundle_dir(config: HubConfig, device: str) -> Path:
    return config.home / "devices" / device


def write_bundle(config: HubConfig, device: str, key: SigningKey | None) -> Path:
    """Write (or replace) the device bundle; returns its directory."""
    directory = bundle_dir(config, device)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if key is not None:
        key.save(directory / DEVICE_KEY_NAME)
        os.chmod(directory / DEVICE_KEY_NAME, 0o600)
    shutil.copyfile(config.trust_root_path, directory / TRUST_ROOT_NAME)
    lines = [
        "# fleetledger device bundle (written by `hub device enroll`)",
        f"format = {BUNDLE_FORMAT}",
        f"device_id = {toml_str(device)}",
        f"nats_url = {toml_str(config.nats_url)}",
        f"trust_root = {toml_str(TRUST_ROOT_NAME)}",
    ]
    if key is not None:
        lines.append(f"device_key = {toml_str(DEVICE_KEY_NAME)}")
    ca = ca_path(config.home)
    if ca is not None:
        shutil.copyfile(ca, directory / CA_NAME)
        lines.append(f"nats_ca = {toml_str(CA_NAME)}")
    (directory / DEVICE_TOML).write_text("\n".join(lines) + "\n")
    return directory
