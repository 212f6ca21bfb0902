"""A device that makes its own key and enrols with a one-time token (issue 12, class 9).

`edge-agent keygen --bundle DIR` writes DIR/device.key (0600); the private key never
leaves the device. `edge-agent enroll --bundle DIR --device-id ID --token T --hub URL`
sends the hub an `enrolment` request {device, public, token, ts} signed by that key on
`hub.enrol`, as the NATS user `enrol` (its password in URL: `nats://enrol:PW@host:port`;
`hub device token create` prints the whole command), with replies under
`_INBOX_ENROL.<random>` (that user's only inbox root). The hub answers the NATS URL, the
trust root and the CA certificate; they are written next to the key as a device bundle
(edge_agent/bundle.py), so `edge-agent run --bundle DIR` starts the device.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from edge_agent import protocol as proto
from edge_agent.bundle import BUNDLE_FORMAT, CA_NAME, DEVICE_KEY_NAME, DEVICE_TOML, TRUST_ROOT_NAME
from edge_agent.errors import DeviceBundleError, FetchError
from edge_agent.transport.connect import NatsAuth, connect
from ledger.durable import atomic_write
from ledger.encoding import canonical_decode
from ledger.errors import KeyFileError
from ledger.signing import SigningKey


class EnrolmentRefused(DeviceBundleError):
    """The hub refused the enrolment (the one-line reason it gave)."""


def keygen(directory: Path, force: bool = False) -> SigningKey:
    """Make the device key in `directory` (0600); refuse to replace one unless `force`."""
    path = directory / DEVICE_KEY_NAME
    if path.exists() and not force:
        raise DeviceBundleError(f"{path} exists; use --force to replace it (the device "
                                "then needs to enrol again)")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = SigningKey.generate()
    key.save(path)
    os.chmod(path, 0o600)
    return key


def load_key(directory: Path) -> SigningKey:
    try:
        return SigningKey.load(directory / DEVICE_KEY_NAME)
    except KeyFileError as exc:
        raise DeviceBundleError(f"{exc} (make one with `edge-agent keygen --bundle "
                                f"{directory}`)") from exc


def enrolment_request(device: str, key: SigningKey, token: str,
                      now_ns: int | None = None) -> bytes:
    request = proto.EnrolmentRequest(device=proto.check_device_id(device),
                                     public=key.public.raw, token=token,
                                     ts=time.time_ns() if now_ns is None else now_ns)
    return proto.SignedEnvelope.sign(request.to_map(), proto.DOMAIN_ENROLMENT, [key]).encode()


async def send_request(hub_url: str, data: bytes, ca_file: Path | None,
                       timeout: float) -> dict[str, Any]:
    """The hub's answer to an enrolment request; EnrolmentRefused with its reason, or
    FetchError when no answer comes."""
    auth = NatsAuth(ca_file=ca_file,
                    inbox_prefix=f"{proto.ENROL_INBOX_ROOT}.{secrets.token_hex(8)}")
    try:
        nc = await connect(hub_url, auth, retry_for=0, name="edge-agent enroll",
                           allow_reconnect=False, connect_timeout=timeout)
    except Exception as exc:
        raise FetchError(f"cannot reach NATS at {_without_password(hub_url)}: {exc}") from exc
    try:
        msg = await nc.request(proto.ENROL_SUBJECT, data, timeout=timeout)
    except Exception as exc:
        raise FetchError(f"no answer from the hub on {proto.ENROL_SUBJECT} within "
                         f"{timeout:g} s ({exc!r}); is the hub running, and is the "
                         "password in --hub the `enrol` user's?") from exc
    finally:
        await nc.close()
    reply = canonical_decode(msg.data)
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else None
        raise EnrolmentRefused(str(error or "the hub's answer is unreadable"))
    result = reply.get("result")
    if not isinstance(result, dict):
        raise EnrolmentRefused("the hub's answer has no result")
    return result


def write_bundle(directory: Path, device: str, result: dict[str, Any]) -> Path:
    """device.toml, trust-root.bin (and ca.pem) next to the device's own key."""
    root, ca, nats_url = result.get("trust_root"), result.get("ca"), result.get("nats_url")
    if not isinstance(root, bytes) or not isinstance(nats_url, str) or not isinstance(
            ca, bytes):
        raise EnrolmentRefused("the hub's answer lacks the trust root or the NATS URL")
    atomic_write(directory / TRUST_ROOT_NAME, root)
    lines = [
        "# fleetledger device bundle (written by `edge-agent enroll`: the key was made here)",
        f"format = {BUNDLE_FORMAT}",
        f"device_id = {_toml_str(device)}",
        f"nats_url = {_toml_str(nats_url)}",
        f"trust_root = {_toml_str(TRUST_ROOT_NAME)}",
        f"device_key = {_toml_str(DEVICE_KEY_NAME)}",
    ]
    if ca:
        atomic_write(directory / CA_NAME, ca)
        lines.append(f"nats_ca = {_toml_str(CA_NAME)}")
    atomic_write(directory / DEVICE_TOML, ("\n".join(lines) + "\n").encode())
    return directory


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _without_password(url: str) -> str:
    """`url` with any password replaced, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
