"""The hub's home directory: configuration, role keys and the devices' trust root.

    DIR/config.toml     nats_url, database, expiry settings
    DIR/keys/<role>.key Ed25519 seeds (0600): root, release, director, log
    DIR/trust-root.bin  signed trust root handed to devices at enrolment
    DIR/operators/admin.key  the first operator's key (admin, operator, registrant)
    DIR/policy.toml     validation thresholds and approvals per model name
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edge_agent.trust import ROLES, TrustRoot
from ledger.signing import KeyFileError, SigningKey

CONFIG_NAME = "config.toml"
POLICY_NAME = "policy.toml"
BOOTSTRAP_ADMIN = "admin"
BOOTSTRAP_ROLES = ("admin", "operator", "registrant")
DEFAULT_POLICY = """\
# Validation thresholds and approvals, per model name (`hub model validate` reads this).
# [default] applies to every model; [models.NAME] overrides it for one model.
[default]
task = "classification"
min_accuracy = 0.5
max_group_gap = 0.5
max_flip_rate = 0.5
max_p95_latency_ms = 100.0
approvals_required = 1
"""
TRUST_ROOT_NAME = "trust-root.bin"
DEFAULT_HOME_ENV = "FLEET_HUB_HOME"


class HomeError(Exception):
    """The hub home directory is missing, incomplete or invalid."""


@dataclass(frozen=True)
class HubConfig:
    home: Path
    nats_url: str
    database: str
    manifest_ttl_days: int = 365
    assignment_ttl_days: int = 30
    admin_public: str = ""
    origin: str = "fleetledger/hub"

    @property
    def policy_path(self) -> Path:
        return self.home / POLICY_NAME

    def operator_key_path(self, name: str) -> Path:
        return self.home / "operators" / f"{name}.key"

    @property
    def trust_root_path(self) -> Path:
        return self.home / TRUST_ROOT_NAME

    def key_path(self, role: str) -> Path:
        return self.home / "keys" / f"{role}.key"

    def load_key(self, role: str) -> SigningKey:
        try:
            return SigningKey.load(self.key_path(role))
        except KeyFileError as exc:
            raise HomeError(str(exc)) from exc

    def database_url(self) -> str:
        """A path relative to the home directory, or a SQLAlchemy URL as given."""
        if "://" in self.database or self.database.startswith("sqlite:"):
            return self.database
        path = Path(self.database)
        return str(path if path.is_absolute() else self.home / path)


def init_home(
    home: Path, nats_url: str, database: str = "ledger.db", force: bool = False
) -> HubConfig:
    """Create keys for every role, the signed trust root and the config file."""
    config_path = home / CONFIG_NAME
    if config_path.exists() and not force:
        raise HomeError(f"{home} is already a hub home (use --force to overwrite its keys)")
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    keys = {role: SigningKey.generate() for role in ROLES}
    for role, key in keys.items():
        key.save(home / "keys" / f"{role}.key")
    root = TrustRoot.build({role: [key] for role, key in keys.items()})
    (home / TRUST_ROOT_NAME).write_bytes(root.encode())
    admin = SigningKey.generate()
    admin.save(home / "operators" / f"{BOOTSTRAP_ADMIN}.key")
    if not (home / POLICY_NAME).exists():
        (home / POLICY_NAME).write_text(DEFAULT_POLICY)
    config_path.write_text(
        "# fleetledger hub configuration (written by `hub init`)\n"
        f"nats_url = {_toml_str(nats_url)}\n"
        f"database = {_toml_str(database)}\n"
        "manifest_ttl_days = 365\n"
        "assignment_ttl_days = 30\n"
        "# The first operator, added to the ledger when `hub serve` first starts.\n"
        f"admin_public = {_toml_str(admin.public.raw.hex())}\n"
        f"origin = {_toml_str('fleetledger/' + home.resolve().name)}\n"
    )
    return load_config(home)


def load_config(home: Path, nats_url: str | None = None) -> HubConfig:
    config_path = home / CONFIG_NAME
    try:
        raw = tomllib.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise HomeError(
            f"{config_path} not found: run `hub init {home}` first, or pass --home"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise HomeError(f"{config_path} is not valid TOML: {exc}") from exc
    try:
        return HubConfig(
            home=home,
            nats_url=nats_url or str(raw["nats_url"]),
            database=str(raw.get("database", "ledger.db")),
            manifest_ttl_days=int(raw.get("manifest_ttl_days", 365)),
            assignment_ttl_days=int(raw.get("assignment_ttl_days", 30)),
            admin_public=str(raw.get("admin_public", "")),
            origin=str(raw.get("origin", "fleetledger/hub")),
        )
    except (KeyError, ValueError) as exc:
        raise HomeError(f"{config_path}: missing or invalid setting {exc}") from exc


def set_nats_url(home: Path, nats_url: str) -> None:
    """Point an existing home at another NATS server (the demo's port changes per run)."""
    config_path = home / CONFIG_NAME
    lines = config_path.read_text().splitlines()
    out = [f"nats_url = {_toml_str(nats_url)}" if ln.startswith("nats_url") else ln for ln in lines]
    config_path.write_text("\n".join(out) + "\n")


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
