"""The hub's home directory: configuration, role keys and the devices' trust root.

    DIR/config.toml     nats_url, database, expiry settings
    DIR/keys/<role>.key Ed25519 seeds (0600): root, release, director, log
    DIR/trust-root.bin  signed trust root handed to devices at enrolment
    DIR/log.vkey        the log's C2SP verifier key (checkpoints), for witnesses/auditors
    DIR/witnesses       witness verifier keys whose cosignatures the hub stores
    DIR/operators/admin.key  the first operator's key (admin, operator, registrant)
    DIR/policy.toml     validation thresholds and approvals per model name
    DIR/nats/           nats-server.conf, users.conf, credentials.toml, tls/ (nats_config.py)
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.transport.connect import NatsAuth
from edge_agent.trust.root import ROLES, TrustRoot
from hub.errors import UsageError
from hub.home.nats_config import auth_for, listen_address, operator_auth, write_server_config
from ledger.errors import KeyFileError
from ledger.merkle import DEFAULT_TREE_HASH, HASHES
from ledger.note import Signer, valid_key_name
from ledger.signing import SigningKey

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
LOG_VKEY_NAME = "log.vkey"
LOG_KEYS_DIR = "log-keys"  # <keyid>.vkey of every log key the hub ever had
DEFAULT_HOME_ENV = "FLEET_HUB_HOME"


class HomeError(UsageError):
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
    # The Merkle tree hash a new ledger is created with; None: the store's default.
    # An existing ledger keeps the one it recorded (opening it with another fails).
    tree_hash: str | None = None
    # Prometheus /metrics on "ADDR:PORT" (hub/telemetry/metrics.py); None = off, port 0 =
    # any free port. config.toml `metrics_listen`, or `metrics_port = P` = 127.0.0.1:P.
    metrics_listen: str | None = None
    # The read-only dashboard (hub/web/): `hub serve --web ADDR`, off by default. A
    # non-loopback address needs the token (never printed: repr=False).
    web_listen: str | None = None
    web_token: str | None = field(default=None, repr=False)
    # Checkpoints (hub/log/checkpointer.py): sign after this many new entries or seconds.
    checkpoint_every_entries: int = 100
    checkpoint_every_seconds: float = 10.0
    # KV kept in line with the ledger (hub/service/reconcile.py): compared this often
    # (and at once after a NATS reconnect); a failed KV write is retried until it lands.
    reconcile_every_seconds: float = 30.0
    # How long a command or the rollout controller retries a KV write itself before
    # leaving it to the reconciler (it never blocks a wave for a whole outage).
    kv_write_give_up_seconds: float = 30.0
    # Several `hub serve` on one PostgreSQL (hub/commands/leadership.py): the leader's
    # lease; a standby takes over at most this long (plus a quarter) after the leader
    # stops renewing it.
    leader_lease_seconds: float = 10.0
    # Overrides assignment_ttl_days when set (tests use a few seconds).
    assignment_ttl_seconds: float | None = None
    # The signed timestamp's lifetime (hub/keys/timestamps.py): a device refuses new
    # authority without an unexpired one; the hub signs a new one when half is left.
    timestamp_ttl_seconds: float = 3600.0
    # Retention of the JetStream streams (hub/service/nats.py, docs/PROTOCOL.md
    # "Retention"): a device flood or a long hub outage cannot fill the server's disk.
    # REPORTS is an inbox the hub empties; LEDGER is a feed (the ledger is the record).
    reports_max_age_days: float = 7.0
    reports_max_bytes: int = 1 << 30
    reports_max_msgs_per_subject: int = 50_000
    ledger_feed_max_age_days: float = 7.0
    ledger_feed_max_bytes: int = 1 << 30
    # The UPLOADS staging stream (hub/uploads.py): its size, and so the largest blob one
    # upload may carry; an upload is dropped after `uploads_max_age_seconds` unclaimed.
    uploads_max_bytes: int = 1 << 30
    uploads_max_age_seconds: float = 3600.0
    # Replicas of every stream and bucket the hub creates (hub/service/nats.py): 3 on a
    # cluster of 3+ nodes (`hub init --cluster`), else 1. Raised or lowered in place on
    # the streams that exist already, at every `hub serve`.
    nats_replicas: int = 1

    @property
    def assignment_ttl_s(self) -> float:
        """The lifetime of a signed assignment; live ones are renewed when a third of
        it is left (hub/service/reconcile.py)."""
        if self.assignment_ttl_seconds is not None:
            return self.assignment_ttl_seconds
        return self.assignment_ttl_days * 86400.0

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

    def operator_auth(self, key: SigningKey) -> NatsAuth:
        """NATS credentials of the operator holding `key` (its nkey), and the TLS CA."""
        return operator_auth(self.home, key)

    def nats_auth(self, role: str) -> NatsAuth:
        """NATS credentials (and the TLS CA) of `hub` or `witness` (operators: operator_auth)."""
        return auth_for(self.home, role)

    def database_url(self) -> str:
        """A path relative to the home directory, or a SQLAlchemy URL as given."""
        if "://" in self.database or self.database.startswith("sqlite:"):
            return self.database
        path = Path(self.database)
        return str(path if path.is_absolute() else self.home / path)


def default_origin() -> str:
    """A URL-like origin unique to this hub (tlog-checkpoint: "a schema-less URL"): the
    log's identity in checkpoints and its key name, so it is made once, at init."""
    return f"fleetledger.local/{secrets.token_hex(8)}"


def init_home(
    home: Path, nats_url: str, database: str = "ledger.db", force: bool = False,
    nats_auth: bool = True, tls: bool = False, origin: str | None = None,
    tree_hash: str = DEFAULT_TREE_HASH, cluster: int = 0,
    cluster_hosts: list[str] | None = None, cluster_port: int = 6222, leaf_port: int = 7422,
) -> HubConfig:
    """Create keys for every role, the signed trust root and the config file; with
    `nats_auth`, the NATS server's configuration and identities (hub/home/nats_config.py),
    with `tls` also a CA and a server certificate. `origin` names the log (default: a
    new `fleetledger.local/<random id>`); `tree_hash` is the new ledger's Merkle tree
    hash (default SHA-256, RFC 6962). `cluster` = N > 0: also one configuration per node
    of an N-node nats-server cluster (hub/home/nats_cluster.py), `nats_url` then lists
    every node and the streams get 3 replicas when N >= 3."""
    if origin is not None and not valid_key_name(origin):
        raise HomeError(f"origin {origin!r} must be non-empty, with no spaces, no '+' and "
                        "no control characters (e.g. example.com/fleet-log)")
    if tree_hash not in HASHES:
        raise HomeError(f"tree hash {tree_hash!r}: choose one of {', '.join(HASHES)}")
    config_path = home / CONFIG_NAME
    if config_path.exists() and not force:
        raise HomeError(f"{home} is already a hub home (use --force to overwrite its keys)")
    nodes = []
    if cluster and not nats_auth:
        raise HomeError("--cluster writes nats-server configurations: drop --no-auth")
    if nats_auth or tls:
        from hub.home.nats_cluster import cluster_nodes, cluster_url, write_cluster_configs

        try:
            listen_address(nats_url)  # the server's `listen` line comes from it
            nodes = (cluster_nodes(nats_url, cluster, cluster_hosts, cluster_port, leaf_port)
                     if cluster else [])
        except ValueError as exc:
            raise HomeError(str(exc)) from exc
        if nodes:
            nats_url = cluster_url(nodes, tls)
    replicas = 3 if cluster >= 3 else 1
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
    # The log's identity in checkpoints and its key name: no spaces, no '+'.
    origin = origin or default_origin()
    config_path.write_text(
        "# fleetledger hub configuration (written by `hub init`)\n"
        f"nats_url = {toml_str(nats_url)}\n"
        f"database = {toml_str(database)}\n"
        "manifest_ttl_days = 365\n"
        "assignment_ttl_days = 30\n"
        "# The first operator, added to the ledger when `hub serve` first starts.\n"
        f"admin_public = {toml_str(admin.public.raw.hex())}\n"
        f"origin = {toml_str(origin)}\n"
        "# The Merkle tree hash of a new ledger (sha256: RFC 6962, or blake3); a ledger\n"
        "# keeps the one it was created with.\n"
        f"tree_hash = {toml_str(tree_hash)}\n"
        "# Replicas of the hub's JetStream streams and buckets (3 on a cluster of 3+).\n"
        f"nats_replicas = {replicas}\n"
        "# Signed checkpoints of the ledger: after this many new entries or seconds.\n"
        "checkpoint_every_entries = 100\n"
        "checkpoint_every_seconds = 10.0\n"
        "# Retention of the REPORTS stream and the LEDGER feed (docs/PROTOCOL.md\n"
        "# \"Retention\"), applied to the streams at every `hub serve`.\n"
        "# reports_max_age_days = 7.0\n"
        "# reports_max_bytes = 1073741824\n"
        "# reports_max_msgs_per_subject = 50000\n"
        "# ledger_feed_max_age_days = 7.0\n"
        "# ledger_feed_max_bytes = 1073741824\n"
        "# The upload staging stream: the largest upload, and how long one is kept.\n"
        "# uploads_max_bytes = 1073741824\n"
        "# uploads_max_age_seconds = 3600.0\n"
    )
    # The log's C2SP verifier key: what witnesses and auditors pass as --log-key.
    log_vkey = Signer.from_signing_key(origin, keys["log"]).vkey()
    (home / LOG_VKEY_NAME).write_text(log_vkey + "\n")
    (home / LOG_KEYS_DIR).mkdir(exist_ok=True)
    (home / LOG_KEYS_DIR / f"{keys['log'].keyid}.vkey").write_text(log_vkey + "\n")
    if nats_auth or tls:
        write_server_config(home, tls=tls, operators=[(admin.keyid, admin.public.raw)],
                            nats_url=nats_url)
        if nodes:
            write_cluster_configs(home, nodes, tls)
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
            tree_hash=_tree_hash(raw.get("tree_hash")),
            metrics_listen=_metrics_listen(raw),
            checkpoint_every_entries=int(raw.get("checkpoint_every_entries", 100)),
            checkpoint_every_seconds=float(raw.get("checkpoint_every_seconds", 10.0)),
            reconcile_every_seconds=float(raw.get("reconcile_every_seconds", 30.0)),
            kv_write_give_up_seconds=float(raw.get("kv_write_give_up_seconds", 30.0)),
            leader_lease_seconds=_positive(raw, "leader_lease_seconds", 10.0),
            timestamp_ttl_seconds=float(raw.get("timestamp_ttl_seconds", 3600.0)),
            assignment_ttl_seconds=(float(raw["assignment_ttl_seconds"])
                                    if "assignment_ttl_seconds" in raw else None),
            reports_max_age_days=_positive(raw, "reports_max_age_days", 7.0),
            reports_max_bytes=int(_positive(raw, "reports_max_bytes", 1 << 30)),
            reports_max_msgs_per_subject=int(
                _positive(raw, "reports_max_msgs_per_subject", 50_000)),
            ledger_feed_max_age_days=_positive(raw, "ledger_feed_max_age_days", 7.0),
            ledger_feed_max_bytes=int(_positive(raw, "ledger_feed_max_bytes", 1 << 30)),
            uploads_max_bytes=int(_positive(raw, "uploads_max_bytes", 1 << 30)),
            uploads_max_age_seconds=_positive(raw, "uploads_max_age_seconds", 3600.0),
            nats_replicas=_replicas(raw),
        )
    except (KeyError, ValueError) as exc:
        raise HomeError(f"{config_path}: missing or invalid setting {exc}") from exc


def _positive(raw: dict[str, object], name: str, default: float) -> float:
    """A retention limit: a number > 0 (there is no "unlimited")."""
    value = float(str(raw.get(name, default)))
    if not value > 0:
        raise ValueError(f"{name} must be > 0, not {value}")
    return value


def _replicas(raw: dict[str, object]) -> int:
    """JetStream takes 1 to 5 replicas (an odd number is what survives a node loss)."""
    value = int(str(raw.get("nats_replicas", 1)))
    if not 1 <= value <= 5:
        raise ValueError(f"nats_replicas must be 1 to 5, not {value}")
    return value


def _metrics_listen(raw: dict[str, object]) -> str | None:
    if "metrics_listen" in raw:
        parse_listen(str(raw["metrics_listen"]))  # refused at load, not at serve
        return str(raw["metrics_listen"])
    if "metrics_port" in raw:
        return f"127.0.0.1:{int(str(raw['metrics_port']))}"
    return None


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT` (`[::1]:9464` for IPv6; a bare `PORT` is 127.0.0.1:PORT) as (host,
    port); ValueError with the expected form otherwise."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics listen address {text!r}: use ADDR:PORT, e.g. "
                         "127.0.0.1:9464, 0.0.0.0:9464 or [::1]:9464")
    return host, int(port)


def _tree_hash(value: object) -> str | None:
    if value is None:
        return None
    if value not in HASHES:
        raise ValueError(f"tree_hash {value!r} (choose one of {', '.join(HASHES)})")
    return str(value)


def set_nats_url(home: Path, nats_url: str) -> None:
    """Point an existing home at another NATS server (the demo's port changes per run)."""
    config_path = home / CONFIG_NAME
    lines = config_path.read_text().splitlines()
    out = [f"nats_url = {toml_str(nats_url)}" if ln.startswith("nats_url") else ln for ln in lines]
    config_path.write_text("\n".join(out) + "\n")


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
