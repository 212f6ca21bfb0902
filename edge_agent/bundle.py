"""The device bundle written at enrolment (`hub device enroll`), read by the agent.

A directory with `device.toml` (a flat TOML table), the device's private key and the
trust root it pins. Keys of device.toml:

    format      1
    device_id   the enrolled device id
    nats_url    where the hub's NATS server is
    trust_root  file name of the pinned trust root, relative to the bundle
    device_key  file name of the device's Ed25519 key (absent: the key lives elsewhere);
                it is also the device's NATS nkey (edge_agent/transport/connect.py)
    nats_ca     file name of the NATS server's CA certificate (present when TLS is on)
    require_inclusion  true: install only releases proven in a witnessed checkpoint
                (model transparency; same as `edge-agent run --require-inclusion`)

Unknown keys are ignored, so later versions can add files (NATS credentials).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import DeviceBundleError

BUNDLE_FORMAT = 1
DEVICE_TOML = "device.toml"
DEVICE_KEY_NAME = "device.key"
TRUST_ROOT_NAME = "trust-root.bin"
CA_NAME = "ca.pem"


@dataclass(frozen=True)
class DeviceBundle:
    directory: Path
    device_id: str
    nats_url: str
    trust_root: Path
    device_key: Path | None
    nats_ca: Path | None = None
    require_inclusion: bool = False

    @classmethod
    def load(cls, directory: Path) -> DeviceBundle:
        path = directory / DEVICE_TOML
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise DeviceBundleError(f"{path} not found: is {directory} a device bundle from "
                              "`hub device enroll`?") from exc
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise DeviceBundleError(f"{path}: {exc}") from exc
        if raw.get("format", BUNDLE_FORMAT) != BUNDLE_FORMAT:
            raise DeviceBundleError(f"{path}: format {raw.get('format')!r} is not supported")
        try:
            device_id = str(raw["device_id"])
            nats_url = str(raw["nats_url"])
            trust_root = directory / str(raw.get("trust_root", TRUST_ROOT_NAME))
        except KeyError as exc:
            raise DeviceBundleError(f"{path}: missing setting {exc}") from exc
        key = raw.get("device_key")
        ca = raw.get("nats_ca")
        require = raw.get("require_inclusion", False)
        if not isinstance(require, bool):
            raise DeviceBundleError(f"{path}: require_inclusion must be true or false")
        return cls(directory, device_id, nats_url, trust_root,
                   directory / str(key) if key else None,
                   directory / str(ca) if ca else None, require)
