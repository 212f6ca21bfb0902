"""The NATS server's identities and permissions, written into the hub's home.

`hub init` writes

    HOME/nats/nats-server.conf    pid_file, `listen` (from --nats), JetStream's store_dir
                                  (HOME/nats/jetstream), `include users.conf`, TLS (--tls)
    HOME/nats/users.conf          one user per identity with its permissions (0600)
    HOME/nats/credentials.toml    passwords of the hub and witness users (0600)
    HOME/nats/tls/                ca.pem, ca.key, server.pem, server.key (with --tls)

and the hub rewrites users.conf whenever a device or an operator is added or revoked
(and at start, from the ledger's device and operator tables), then asks the server to
reload it: SIGHUP to the PID in HOME/nats/nats-server.pid (the server writes that file
itself, from `pid_file`).
A server on another machine is reloaded by its operator (`nats-server --signal reload`).

Identities (docs/PROTOCOL.md, "Permissions", lists the exact subjects):

- hub: everything (it owns the streams, buckets and the API);
- one user per operator, identified by its nkey (= the operator's own Ed25519 key, the
  one that signs its commands): the hub's signed-command API, the ledger API, staging
  uploads on its own `upload.<keyid>.>` subjects (no Object Store rights); replies only
  under its own inbox prefix. Revoking the operator removes it, so
  a revoked key cannot even reach the hub;
- witness: the ledger API, the ledger feed, and cosignatures;
- one user per device, identified by its nkey (= its Ed25519 device key): its own
  assignment, the roots and manifests buckets and released model blobs (the
  `releases` bucket, not `models`) to read, its own report
  subjects to publish; replies only under its own inbox prefix.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from edge_agent.protocol.names import (
    API_PREFIX,
    ASSIGNMENTS_BUCKET,
    CLUSTER_JS_DOMAIN,
    ENROL_INBOX_ROOT,
    ENROL_SUBJECT,
    LEDGER_CHECKPOINT_SUBJECT,
    LEDGER_ENTRY_SUBJECT,
    MANIFESTS_BUCKET,
    RELEASES_BUCKET,
    REPORT_SUBJECTS,
    ROOTS_BUCKET,
    TRANSPARENCY_BUCKET,
    device_report_subjects,
    upload_subjects,
)
from edge_agent.transport.connect import NatsAuth, device_inbox_prefix, nkey_public, nkey_seed
from hub.home.nats_check import check_users_text, new_probe, without_probe
from ledger.durable import atomic_write
from ledger.signing import SigningKey

log = logging.getLogger(__name__)

NATS_DIR = "nats"
SERVER_CONF = "nats-server.conf"
USERS_CONF = "users.conf"
CREDENTIALS = "credentials.toml"
PID_FILE = "nats-server.pid"
PROBE_SEED = "reload-probe.seed"  # the users file's reload probe (hub.home.nats_check)
TLS_DIR = "tls"
CA_CERT = "ca.pem"
# Password users. Operators are nkey users (one per operator key), not a shared password.
# `enrol` is what a device that made its own key connects as before it is enrolled
# (homes made before it have no such user: the device-made-key path is then off).
ROLES = ("hub", "witness", "enrol")
RELOAD_SETTLE_SECONDS = 0.2
SITES_DIR = "sites"  # HOME/sites/NAME/: an edge site's leaf node (hub/home/sites.py)
LEAF_PID = "leaf.pid"
LINK = "link.toml"  # HOME/sites/NAME/link.toml: the site's leaf link password
# The identities users.conf was written from last (public keys only), so that `hub site
# add` can write it again without the hub's database.
IDENTITIES = "identities.json"

ASG = f"KV_{ASSIGNMENTS_BUCKET}"
# Devices read released blobs only: `releases`, never `models` (validation sets,
# unreleased and refused models; hub/uploads.py).
OBJ = f"OBJ_{RELEASES_BUCKET}"
READ_BUCKETS = (f"KV_{ROOTS_BUCKET}", f"KV_{MANIFESTS_BUCKET}", f"KV_{TRANSPARENCY_BUCKET}",
                OBJ)


def nats_dir(home: Path) -> Path:
    return home / NATS_DIR


def server_conf_path(home: Path) -> Path:
    return nats_dir(home) / SERVER_CONF


def ca_path(home: Path) -> Path | None:
    path = nats_dir(home) / TLS_DIR / CA_CERT
    return path if path.exists() else None


# ---------------------------------------------------------------- permissions


def device_permissions(device: str) -> dict[str, list[str]]:
    """What one device may publish and subscribe to (and nothing else)."""
    publish = [device_report_subjects(device)]
    publish += [f"$JS.API.STREAM.INFO.{s}" for s in (ASG, *READ_BUCKETS)]
    # Its own assignment only: the consumer's filter subject is part of the API subject
    # (nats-server 2.10+), so a consumer on another device's key is refused.
    publish.append(f"$JS.API.CONSUMER.CREATE.{ASG}.*.$KV.{ASSIGNMENTS_BUCKET}.{device}")
    publish.append(f"$JS.FC.{ASG}.>")
    # No `$JS.API.CONSUMER.DELETE.>` (a device could delete consumers it does not own:
    # consumer names are one free token, so no subject names only its own) and no
    # `$JS.API.CONSUMER.DURABLE.CREATE.>`. A consumer a device creates (even a durable,
    # by name in the body) expires once unused: every device-readable stream caps its
    # consumers' inactive threshold (hub.service.nats.allow_fleet_consumers).
    for stream in READ_BUCKETS:  # readable by every device: no secrets in them
        publish += [
            f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>",
        ]
    # The same JetStream API calls through a leaf node of an edge site, under the
    # cluster's domain (`$JS.<domain>.API.>`; the server maps them to `$JS.API.>`).
    domain_prefix = f"$JS.{CLUSTER_JS_DOMAIN}.API."
    publish += [domain_prefix + s[len("$JS.API."):] for s in publish if s.startswith("$JS.API.")]
    return {"publish": publish, "subscribe": [device_inbox_prefix(device) + ".>"]}


OPERATOR_INBOX_ROOT = "_INBOX_OPERATOR"


def operator_inbox_prefix(keyid: str) -> str:
    """The reply-inbox prefix an operator must use (a root no device id can take)."""
    return f"{OPERATOR_INBOX_ROOT}.{keyid}"


def operator_permissions(keyid: str) -> dict[str, list[str]]:
    """What one operator may publish and subscribe to."""
    return {"publish": [*OPERATOR_PERMISSIONS["publish"], upload_subjects(keyid)],
            "subscribe": [operator_inbox_prefix(keyid) + ".>", LEDGER_ENTRY_SUBJECT,
                          LEDGER_CHECKPOINT_SUBJECT]}


OPERATOR_PERMISSIONS = {
    "publish": [
        # No Object Store rights at all: an operator stages an upload on its own
        # `upload.<keyid>.>` subjects (operator_permissions adds them), and the hub
        # checks it and stores it (hub/uploads.py).
        API_PREFIX + ">", "ledger.api.>",
    ],
    "subscribe": ["_INBOX.>", LEDGER_ENTRY_SUBJECT, LEDGER_CHECKPOINT_SUBJECT],
}
# One request subject and its own inbox root: no JetStream API, no other subject. Its
# password is shared by every device not yet enrolled, so it is treated as public; what
# it can do is ask the hub to enrol a key with a one-time token (docs/SECURITY.md).
ENROL_PERMISSIONS = {
    "publish": [ENROL_SUBJECT],
    "subscribe": [ENROL_INBOX_ROOT + ".>"],
}
WITNESS_PERMISSIONS = {
    "publish": ["ledger.api.>", "ledger.cosignature"],
    "subscribe": ["_INBOX.>", LEDGER_ENTRY_SUBJECT, LEDGER_CHECKPOINT_SUBJECT],
}


def site_user(name: str) -> str:
    """The NATS user an edge site's leaf node links to the cluster as."""
    return f"site-{name}"


def site_link_permissions() -> dict[str, list[str]]:
    """What a site's leaf link may carry (nats-server exports to the cluster the subjects
    the link user may publish, and imports those it may subscribe to): the union of every
    device's rights (report subjects, the JetStream API calls on the device-readable
    streams and the own-key assignment consumer, enrolment requests) toward the
    cluster, and device reply inboxes and enrolment answers back. The leaf itself holds
    each device to its own permissions; a compromised leaf can do what any device may do
    (not sign as one: reports and enrolments carry the device's own signature)."""
    device = device_permissions("*")
    # Reports: the REPORTS stream's own subject, not `fleet.report.*.>`. The cluster
    # tells the leaf of its interest in a subject (the stream's `fleet.report.>`) only
    # when the link may publish to that very subject; each device is still held to its
    # own report subjects by the leaf.
    publish = [REPORT_SUBJECTS if s == device_report_subjects("*") else s
               for s in device["publish"]]
    return {"publish": [*publish, ENROL_SUBJECT],
            "subscribe": [*device["subscribe"], ENROL_INBOX_ROOT + ".>"]}


def site_links(home: Path) -> list[tuple[str, str]]:
    """(site name, link password) of every edge site of this home."""
    root = home / SITES_DIR
    if not root.is_dir():
        return []
    out = []
    for directory in sorted(root.iterdir()):
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError, KeyError):
            raw = tomllib.loads((directory / LINK).read_text())
            out.append((directory.name, str(raw["password"])))
    return out


def _user_block(head: str, perms: dict[str, list[str]] | None) -> str:
    if perms is None:
        return f"    {{ {head} }}"
    pub = ", ".join(json.dumps(s) for s in perms["publish"])
    sub = ", ".join(json.dumps(s) for s in perms["subscribe"])
    return (f"    {{ {head},\n      permissions: {{\n        publish: {{ allow: [{pub}] }},\n"
            f"        subscribe: {{ allow: [{sub}] }} }} }}")


# ---------------------------------------------------------------- files


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode(), 0o600)


def load_credentials(home: Path) -> dict[str, str]:
    """role -> password; empty when the home has no NATS identities (auth off)."""
    path = nats_dir(home) / CREDENTIALS
    if not path.exists():
        return {}
    raw = tomllib.loads(path.read_text())
    return {role: str(raw[role]["password"]) for role in ROLES if role in raw}


def auth_for(home: Path, role: str) -> NatsAuth:
    """Connect options for the hub (`hub`) or witnesses (`witness`); operators connect
    with their own key (`operator_auth`)."""
    passwords = load_credentials(home)
    ca = ca_path(home)
    if role not in passwords:
        return NatsAuth(ca_file=ca)
    return NatsAuth(user=role, password=passwords[role], ca_file=ca)


def operator_auth(home: Path, key: SigningKey) -> NatsAuth:
    """Connect options for the operator holding `key`: its nkey and inbox prefix (just
    the CA, if any, when the home has no NATS identities)."""
    ca = ca_path(home)
    if not load_credentials(home):
        return NatsAuth(ca_file=ca)
    return NatsAuth(nkey_seed=nkey_seed(key.private_raw()), ca_file=ca,
                    inbox_prefix=operator_inbox_prefix(key.keyid))


def listen_address(nats_url: str) -> str:
    """`host:port` for the server's `listen` line, from the URL clients use (the first
    one of a comma-separated list; port 4222 when the URL names none)."""
    first = nats_url.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or 4222
    except ValueError as exc:
        raise ValueError(f"not a NATS URL: {nats_url!r}") from exc
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def jetstream_dir(home: Path) -> Path:
    """Where the server keeps JetStream's files: in the hub's home, not the shared
    /tmp/nats. (The configuration's `store_dir` is HOME/nats: the server adds
    `jetstream/` itself.)"""
    return nats_dir(home) / "jetstream"


def write_server_config(home: Path, tls: bool = False,
                        operators: Iterable[tuple[str, bytes]] = (),
                        nats_url: str = "nats://127.0.0.1:4222") -> Path:
    """Create the identities, the users file and the server configuration. The server
    listens only where `nats_url` points (nats-server binds 0.0.0.0:4222 without a
    `listen` line) and keeps JetStream under HOME/nats/jetstream. The flags `-a` and
    `-p` override the listen line; `-sd` may not be given with this file (nats-server
    refuses a store_dir set twice), so testkit/nats_server.py leaves it out."""
    directory = nats_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    creds = "".join(f'[{role}]\nuser = "{role}"\npassword = "{secrets.token_urlsafe(24)}"\n\n'
                    for role in ROLES)
    _write_private(directory / CREDENTIALS, "# NATS passwords (written by `hub init`)\n" + creds)
    write_users(home, [], operators)
    lines = [
        "# nats-server configuration written by `hub init`.",
        "# The hub rewrites users.conf on device enrolment/revocation and sends SIGHUP to",
        "# the PID in pid_file; for a server elsewhere, reload it yourself.",
        f"pid_file: {json.dumps(str((directory / PID_FILE).resolve()))}",
        f"listen: {json.dumps(listen_address(nats_url))}",
        f"jetstream {{ store_dir: {json.dumps(str(directory.resolve()))} }}",
        "include users.conf",
    ]
    if tls:
        tls_dir = directory / TLS_DIR
        make_tls_files(tls_dir)
        lines += ["tls {",
                  f"  cert_file: {json.dumps(str((tls_dir / 'server.pem').resolve()))}",
                  f"  key_file: {json.dumps(str((tls_dir / 'server.key').resolve()))}",
                  "  timeout: 2", "}"]
    _write_private(directory / SERVER_CONF, "\n".join(lines) + "\n")
    return directory / SERVER_CONF


# ---------------------------------------------------------------- a cluster

CLUSTER_NAME = "fleetledger"
CLUSTER_PORT = 6222  # nats-server's usual route port
LEAF_PORT = 7422  # nats-server's usual leaf node port
ROUTE_USER = "route"
NODE_CONF = "node-{}.conf"
NODE_PID = "node-{}.pid"


@dataclass(frozen=True)
class ClusterNode:
    """One nats-server of the cluster: where its clients, routes and leaf nodes connect."""

    index: int  # 1..N
    host: str
    client_port: int
    cluster_port: int
    leaf_port: int

    @property
    def name(self) -> str:
        return f"fleet-{self.index}"

    def url(self, scheme: str = "nats") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.client_port}"

    def hostport(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"


def cluster_nodes(nats_url: str, size: int, hosts: list[str] | None = None,
                  cluster_port: int = CLUSTER_PORT, leaf_port: int = LEAF_PORT,
                  ) -> list[ClusterNode]:
    """`size` nodes. On one host (loopback, or the host of `nats_url`) their ports count
    up from the client port of `nats_url`, `cluster_port` and `leaf_port`; on as many
    distinct `hosts` as nodes every node uses those ports on its own host."""
    if size < 1:
        raise ValueError("a cluster has at least one node")
    first = listen_address(nats_url)
    host, _, port = first.rpartition(":")
    host = host.strip("[]")
    if hosts:
        if len(hosts) != size:
            raise ValueError(f"{len(hosts)} hosts for {size} nodes: give one host per node")
        spread = len(set(hosts)) == size
    else:
        hosts, spread = [host] * size, False
    return [ClusterNode(i + 1, h, int(port) + (0 if spread else i),
                        cluster_port + (0 if spread else i), leaf_port + (0 if spread else i))
            for i, h in enumerate(hosts)]


def cluster_url(nodes: list[ClusterNode], tls: bool = False) -> str:
    """The comma-separated client URL list of the cluster (config.toml `nats_url`)."""
    return ",".join(node.url("tls" if tls else "nats") for node in nodes)


def node_conf_path(home: Path, index: int) -> Path:
    return nats_dir(home) / NODE_CONF.format(index)


def write_cluster_configs(home: Path, nodes: list[ClusterNode], tls: bool = False) -> list[Path]:
    """One nats-server configuration per node, beside users.conf (so every node includes
    the same identities, and the same `accounts {}` when users.conf has them: static
    accounts are not carried by routes, each node reads them from its own file):
    server_name, listen, its own JetStream store_dir, `cluster { name, listen, routes }`
    with a route password, and `leafnodes { listen }` for edge sites (hub site add)."""
    directory = nats_dir(home)
    route_password = secrets.token_urlsafe(24)
    paths = []
    for node in nodes:
        routes = ", ".join(
            json.dumps(f"nats-route://{ROUTE_USER}:{route_password}@"
                       f"{other.hostport(other.cluster_port)}")
            for other in nodes if other.index != node.index)
        lines = [
            f"# nats-server configuration of cluster node {node.index} of {len(nodes)}, "
            "written by `hub init --cluster`.",
            "# Start every node with `nats-server -c` and its file; they find each other "
            "through the routes.",
            f"server_name: {json.dumps(node.name)}",
            f"pid_file: {json.dumps(str((directory / NODE_PID.format(node.index)).resolve()))}",
            f"listen: {json.dumps(node.hostport(node.client_port))}",
            # The domain: devices behind an edge site's leaf node reach this JetStream
            # as `$JS.<domain>.API` (nats-server keeps JetStreams apart across leaf links).
            "jetstream { store_dir: "
            f"{json.dumps(str((directory / node.name).resolve()))}, "
            f"domain: {json.dumps(CLUSTER_JS_DOMAIN)} }}",
            "cluster {",
            f"  name: {json.dumps(CLUSTER_NAME)}",
            f"  listen: {json.dumps(node.hostport(node.cluster_port))}",
            "  # Routes authenticate: a server that does not know this password cannot join.",
            f"  authorization {{ user: {json.dumps(ROUTE_USER)}, "
            f"password: {json.dumps(route_password)} }}",
            f"  routes: [{routes}]",
            "}",
            "# Edge sites' leaf nodes connect here (hub site add); each signs in as its own",
            "# site link user of users.conf, which may connect only as a leaf node. Not",
            "# advertised: a site links through the addresses its leaf.conf lists (every",
            "# node, or the --uplink a site reaches them by), not the cluster's own.",
            f"leafnodes {{ listen: {json.dumps(node.hostport(node.leaf_port))}, "
            "no_advertise: true }",
            "include users.conf",
        ]
        if tls:
            tls_dir = directory / TLS_DIR
            lines += ["tls {",
                      f"  cert_file: {json.dumps(str((tls_dir / 'server.pem').resolve()))}",
                      f"  key_file: {json.dumps(str((tls_dir / 'server.key').resolve()))}",
                      "  timeout: 2", "}"]
        path = node_conf_path(home, node.index)
        _write_private(path, "\n".join(lines) + "\n")
        paths.append(path)
    return paths


def write_users(home: Path, devices: Iterable[tuple[str, bytes]],
                operators: Iterable[tuple[str, bytes]] = ()) -> bool:
    """Rewrite users.conf: the password users, one nkey user per (device, public) and one
    per (operator key id, public), one leaf link user per edge site; and each edge site's
    own users file (its devices). False (and users.conf not written) when it already
    says that, so the server need not reload."""
    passwords = load_credentials(home)
    if not passwords:
        return False  # this home has no NATS identities (created without them)
    devices, operators = sorted(devices), sorted(operators)
    perms = {"hub": None, "witness": WITNESS_PERMISSIONS, "enrol": ENROL_PERMISSIONS}
    blocks = [_user_block(f"user: {json.dumps(role)}, password: {json.dumps(passwords[role])}",
                          perms[role]) for role in ROLES if role in passwords]
    for keyid, public in operators:
        blocks.append(f"    # operator key {keyid}\n" + _user_block(
            f"nkey: {json.dumps(nkey_public(public))}", operator_permissions(keyid)))
    device_blocks = [f"    # device {device}\n" + _user_block(
        f"nkey: {json.dumps(nkey_public(public))}", device_permissions(device))
        for device, public in devices]
    blocks += device_blocks
    links = site_links(home)
    for name, password in links:
        # Only as a leaf node: the link password is no client login.
        blocks.append(f"    # the leaf link of edge site {name} (hub site add)\n" + _user_block(
            f"user: {json.dumps(site_user(name))}, password: {json.dumps(password)}, "
            'allowed_connection_types: ["LEAFNODE"]', site_link_permissions()))
    _write_site_users(home, [name for name, _ in links], passwords, device_blocks)
    _write_private(nats_dir(home) / IDENTITIES, json.dumps({
        "devices": [[d, p.hex()] for d, p in devices],
        "operators": [[k, p.hex()] for k, p in operators]}) + "\n")
    seed, probe = new_probe()  # proves, once the server lets it in, that it runs this file
    blocks.append(probe)
    text = ("# NATS users (rewritten by the hub when devices or operators change)\n"
            "authorization {\n  users: [\n" + ",\n".join(blocks) + "\n  ]\n}\n")
    path = nats_dir(home) / USERS_CONF
    with contextlib.suppress(OSError):
        if without_probe(path.read_text()) == without_probe(text):
            return False
    # Never in place unless nats-server takes it: a refused file would leave the server
    # on its old users after a reload, and unable to start after a restart.
    check_users_text(server_conf_path(home), USERS_CONF, text)
    _write_private(path, text)
    _write_private(nats_dir(home) / PROBE_SEED, seed + "\n")
    return True


def _write_site_users(home: Path, names: list[str], passwords: dict[str, str],
                      device_blocks: list[str]) -> None:
    """Each edge site's leaf authenticates devices itself: the devices' users (the same
    permissions as on the cluster) and the shared `enrol` user; no hub, witness or
    operator identity (none of them connects at a site, and a site box is less guarded)."""
    blocks = []
    if "enrol" in passwords:
        blocks.append(_user_block(f'user: "enrol", password: {json.dumps(passwords["enrol"])}',
                                  ENROL_PERMISSIONS))
    blocks += device_blocks
    text = ("# NATS users of an edge site's leaf node (rewritten by the hub when devices\n"
            "# change; copy it to a leaf on another machine and reload it)\n"
            "authorization {\n  users: [\n" + ",\n".join(blocks) + "\n  ]\n}\n")
    for name in names:
        path = home / SITES_DIR / name / USERS_CONF
        with contextlib.suppress(OSError):
            if path.read_text() == text:
                continue
        _write_private(path, text)


def rewrite_users(home: Path) -> bool:
    """Write users.conf (and the sites' users files) again from the identities it was
    last written with, then reload the servers that run here (`hub site add`; the hub
    itself writes from its database)."""
    try:
        raw = json.loads((nats_dir(home) / IDENTITIES).read_text())
    except (OSError, ValueError):
        # A home older than that file: the hub writes it at its next start (never a
        # users.conf without the devices and operators it has).
        log.warning("%s: no %s yet; `hub serve` adds the change when it starts", home,
                    IDENTITIES)
        return False
    devices = [(d, bytes.fromhex(p)) for d, p in raw["devices"]]
    operators = [(k, bytes.fromhex(p)) for k, p in raw["operators"]]
    changed = write_users(home, devices, operators)
    if changed:
        reload_server(home)
    return changed


def probe_seed(home: Path) -> str | None:
    """The nkey seed of the reload probe in the users file written last (None: none)."""
    try:
        return (nats_dir(home) / PROBE_SEED).read_text().strip() or None
    except OSError:
        return None


def pid_files(home: Path) -> list[Path]:
    """The PID files of the servers that read this home's users files: the single
    server, every cluster node, every edge site's leaf node (those that run here)."""
    directory = nats_dir(home)
    return [directory / PID_FILE, *sorted(directory.glob(NODE_PID.format("*"))),
            *sorted((home / SITES_DIR).glob(f"*/{LEAF_PID}"))]


def reload_server(home: Path) -> bool:
    """SIGHUP every nats-server whose PID file is in this home and that runs here (the
    single server, or each cluster node and edge site leaf node on this machine)."""
    reloaded = False
    for pid_file in pid_files(home):
        try:
            pid = int(pid_file.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            continue
        if not comm.startswith("nats-server"):
            log.warning("PID %d is %s, not nats-server; not reloading", pid, comm)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
            reloaded = True
    if not reloaded:
        log.warning("no local nats-server for %s: reload it to apply users.conf", home)
        return False
    # The server reloads on its own time (~5 ms here) and says so only in its log. A
    # client whose handshake overlaps the reload can be let in and then dropped, so
    # callers (an enrolment, an operator change) answer only once it has settled.
    time.sleep(RELOAD_SETTLE_SECONDS)
    return True


# ---------------------------------------------------------------- TLS


def make_tls_files(directory: Path, days: int = 825) -> None:
    """A private CA and a server certificate for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> str:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetledger NATS CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(directory / "ca.key", pem_key(ca_key))
    _write_private(directory / "server.key", pem_key(key))
    (directory / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
