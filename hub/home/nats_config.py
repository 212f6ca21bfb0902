"""The NATS server's identities and permissions, written into the hub's home.

`hub init` writes

    HOME/nats/nats-server.conf    pid_file, `listen` (from --nats), JetStream's store_dir
                                  (HOME/nats/jetstream), `include users.conf`, TLS (--tls)
    HOME/nats/users.conf          the accounts, one user per identity with its
                                  permissions (0600)
    HOME/nats/credentials.toml    passwords of the hub and witness users (0600)
    HOME/nats/tls/                ca.pem, ca.key, server.pem, server.key (with --tls)

and the hub rewrites users.conf whenever a device or an operator is added or revoked
(and at start, from the ledger's device and operator tables), then asks the server to
reload it: SIGHUP to the PID in HOME/nats/nats-server.pid (the server writes that file
itself, from `pid_file`).
A server on another machine is reloaded by its operator (`nats-server --signal reload`).

Identities (docs/PROTOCOL.md, "Permissions", lists the exact subjects), each in a NATS
account of its kind; only HUB has JetStream (see "accounts" below):

- hub (account HUB): everything (it owns the streams, buckets and the API);
- one user per operator (OPERATORS), identified by its nkey (= the operator's own
  Ed25519 key, the one that signs its commands): the hub's signed-command API, the
  ledger API, staging uploads on its own `upload.<keyid>.>` subjects (no Object Store
  rights at all; hub/uploads.py checks and stores them); replies only under its own
  inbox prefix. Revoking the operator removes it, so a revoked key cannot even reach
  the hub;
- witness (WITNESS): the ledger API, the ledger feed, and cosignatures;
- one user per device (DEVICES), identified by its nkey (= its Ed25519 device key):
  direct gets of its own assignment and of the roots, manifests and transparency
  buckets and of released model blobs (the `releases` bucket, never `models`), hints
  on its own assignment key and `root.latest`, its own report subjects to publish;
  replies only under its own inbox prefix;
- enrol (ENROL): a device that made its own key, before it is enrolled: one request
  subject (`hub.enrol`) and its own inbox root, nothing else;
- site-NAME (DEVICES) and site-NAME-enrol (ENROL): an edge site's leaf node
  (`hub site add`, hub/home/sites.py), leaf-only, carrying what devices (enrolling
  devices) may send one way and their answers and hints the other.

A cluster (`hub init --cluster`, hub/home/nats_cluster.py) has one configuration per
node, each including the same users.conf; the hub reloads every node and every site
leaf whose PID file is in the home. Each site's own users file (its DEVICES and ENROL
accounts) is rewritten with users.conf.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from edge_agent.protocol.names import (
    API_PREFIX,
    ASSIGNMENTS_BUCKET,
    ENROL_INBOX_ROOT,
    ENROL_SUBJECT,
    LEDGER_CHECKPOINT_SUBJECT,
    LEDGER_ENTRY_SUBJECT,
    MANIFESTS_BUCKET,
    RELEASES_BUCKET,
    REPORT_SUBJECTS,
    ROOT_LATEST_KEY,
    ROOTS_BUCKET,
    TRANSPARENCY_BUCKET,
    device_report_subjects,
    upload_subjects,
)
from edge_agent.transport.connect import NatsAuth, device_inbox_prefix, nkey_public, nkey_seed
from hub.home.nats_check import check_users_text, new_probe, without_probe
from ledger.durable import atomic_write
from ledger.net.remote import API_PREFIX as LEDGER_API_PREFIX
from ledger.net.remote import COSIGNATURE_SUBJECT
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
# A cluster (`hub init --cluster`, hub/home/nats_cluster.py): one configuration and PID
# file per node beside users.conf, which every node includes.
NODE_CONF = "node-{}.conf"
NODE_PID = "node-{}.pid"
# Edge sites (`hub site add`, hub/home/sites.py): HOME/sites/NAME/ holds the leaf
# node's configuration, its own users file, its PID file and the link passwords.
SITES_DIR = "sites"
LEAF_PID = "leaf.pid"
LINK = "link.toml"
# The identities users.conf was written from last (public keys only), so that `hub site
# add` can write it again without the hub's database.
IDENTITIES = "identities.json"


def nats_dir(home: Path) -> Path:
    return home / NATS_DIR


def server_conf_path(home: Path) -> Path:
    return nats_dir(home) / SERVER_CONF


def ca_path(home: Path) -> Path | None:
    path = nats_dir(home) / TLS_DIR / CA_CERT
    return path if path.exists() else None


# ---------------------------------------------------------------- accounts

# Every identity lives in a NATS account of its kind (docs/PROTOCOL.md "Permissions").
# Only HUB has JetStream: the streams, buckets and the Object Store are in it, and only
# the hub's own user is. Nobody else can call the JetStream API there, so nobody can
# make the server write an API response, a direct-get copy or a push delivery into a
# hub subject (issue 12, class 2). What the others may reach comes in through HUB's
# exports: services (a request goes into HUB, its response comes back to the
# requester's reply subject in the requester's own account, by the server's `_R_.`
# mapping) and streams (core messages published in HUB copied out to the importer).
HUB_ACCOUNT = "HUB"
DEVICES_ACCOUNT = "DEVICES"
OPERATORS_ACCOUNT = "OPERATORS"
WITNESS_ACCOUNT = "WITNESS"
ENROL_ACCOUNT = "ENROL"  # devices not enrolled yet: one request subject
PROBE_ACCOUNT = "PROBE"  # the reload probe alone (hub.home.nats_check): no imports

ASG = f"KV_{ASSIGNMENTS_BUCKET}"
# Devices read released blobs only: `releases`, never `models` (validation sets,
# unreleased and refused models; hub/uploads.py).
OBJ = f"OBJ_{RELEASES_BUCKET}"
READ_BUCKETS = (f"KV_{ROOTS_BUCKET}", f"KV_{MANIFESTS_BUCKET}", f"KV_{TRANSPARENCY_BUCKET}",
                OBJ)
DIRECT_GET = "$JS.API.DIRECT.GET."
ROOT_LATEST_SUBJECT = f"$KV.{ROOTS_BUCKET}.{ROOT_LATEST_KEY}"


def direct_get_last(stream: str, subject: str) -> str:
    """The direct-get subject for the last message on `subject` (no request body)."""
    return f"{DIRECT_GET}{stream}.{subject}"


# Operators stage uploads with plain JetStream publishes on their own
# `upload.<keyid>.<id>` subjects (a service import: the UPLOADS stream's PubAck is the
# response) and have no Object Store or other JetStream API rights at all; the hub
# checks an upload and stores it itself (hub/uploads.py, issue 12 class 3).
UPLOAD_SERVICE = "upload.*.>"


# Read-only direct gets every device may send (a device's own publish permission
# narrows the assignments bucket to its own key). No STREAM.*, CONSUMER.* or MSG.*:
# nothing that changes a stream, makes a consumer or lets the caller pick where the
# server delivers.
DEVICE_DIRECT_GET_SERVICES = (
    f"{DIRECT_GET}{ASG}.$KV.{ASSIGNMENTS_BUCKET}.>",
    *(f"{DIRECT_GET}{s}.>" for s in READ_BUCKETS),
    f"{DIRECT_GET}{OBJ}",  # by sequence: one model chunk at a time
)


def hub_exports() -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, subject, importing accounts) of everything HUB exports."""
    services: list[tuple[str, tuple[str, ...]]] = [
        (API_PREFIX + ">", (OPERATORS_ACCOUNT,)),
        (LEDGER_API_PREFIX + ">", (OPERATORS_ACCOUNT, WITNESS_ACCOUNT)),
        (COSIGNATURE_SUBJECT, (WITNESS_ACCOUNT,)),
        # A JetStream publish: the REPORTS stream's PubAck is the service's response.
        (REPORT_SUBJECTS, (DEVICES_ACCOUNT,)),
        *((s, (DEVICES_ACCOUNT,)) for s in DEVICE_DIRECT_GET_SERVICES),
        (UPLOAD_SERVICE, (OPERATORS_ACCOUNT,)),
        (ENROL_SUBJECT, (ENROL_ACCOUNT,)),
    ]
    # A KV put is a message on `$KV.<bucket>.<key>`: delivered to core subscribers in
    # the importing account, which take it as a hint to direct-get the value.
    streams: list[tuple[str, tuple[str, ...]]] = [
        (f"$KV.{ASSIGNMENTS_BUCKET}.*", (DEVICES_ACCOUNT,)),
        (ROOT_LATEST_SUBJECT, (DEVICES_ACCOUNT,)),
        (LEDGER_ENTRY_SUBJECT, (OPERATORS_ACCOUNT, WITNESS_ACCOUNT)),
        (LEDGER_CHECKPOINT_SUBJECT, (OPERATORS_ACCOUNT, WITNESS_ACCOUNT)),
    ]
    merged: dict[tuple[str, str], tuple[str, ...]] = {}
    for kind, rows in (("service", services), ("stream", streams)):
        for subject, accounts in rows:  # one export per subject: a second would replace it
            held = merged.get((kind, subject), ())
            merged[kind, subject] = held + tuple(a for a in accounts if a not in held)
    return [(kind, subject, accounts) for (kind, subject), accounts in merged.items()]


# ---------------------------------------------------------------- permissions
# Inside each account, every user keeps its own subject permissions (defence in depth:
# a device may send only its own report subjects and direct-get only its own assignment).


def device_permissions(device: str) -> dict[str, list[str]]:
    """What one device may publish and subscribe to (and nothing else)."""
    publish = [device_report_subjects(device),
               direct_get_last(ASG, f"$KV.{ASSIGNMENTS_BUCKET}.{device}"),
               *(f"{DIRECT_GET}{s}.>" for s in READ_BUCKETS), f"{DIRECT_GET}{OBJ}"]
    subscribe = [device_inbox_prefix(device) + ".>", f"$KV.{ASSIGNMENTS_BUCKET}.{device}",
                 ROOT_LATEST_SUBJECT]
    return {"publish": publish, "subscribe": subscribe}


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
    # No Object Store rights: uploads are staged on `upload.<keyid>.>`, which
    # operator_permissions adds per operator.
    "publish": [API_PREFIX + ">", LEDGER_API_PREFIX + ">"],
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
    "publish": [LEDGER_API_PREFIX + ">", COSIGNATURE_SUBJECT],
    "subscribe": ["_INBOX.>", LEDGER_ENTRY_SUBJECT, LEDGER_CHECKPOINT_SUBJECT],
}


# ---------------------------------------------------------------- edge sites' leaf links
# A site's leaf node links to the cluster as two users, one per account its devices use:
# `site-NAME` in DEVICES and `site-NAME-enrol` in ENROL, each allowed to connect only as
# a leaf node. A leaf link user's permissions are what crosses the link (the cluster
# takes from the leaf what the user may publish and sends it what the user may
# subscribe to): here exactly DEVICES' (ENROL's) imports one way and device (enrolling
# device) reply inboxes and hints the other. So the link can do what any device of the
# fleet may do and nothing else: no other account, no JetStream (DEVICES has none).


def site_user(name: str) -> str:
    """The NATS user (account DEVICES) an edge site's leaf node links as."""
    return f"site-{name}"


def site_enrol_user(name: str) -> str:
    """The NATS user (account ENROL) the site's leaf links its enrolments through."""
    return f"site-{name}-enrol"


def site_link_permissions() -> dict[str, list[str]]:
    """The DEVICES link: the account's import subjects toward the cluster (the leaf
    holds each device to its own ones; the cluster propagates its interest in an import
    to the leaf only when the link may publish to that very subject), device reply
    inboxes and the assignment and root hints back."""
    return {"publish": [REPORT_SUBJECTS, *DEVICE_DIRECT_GET_SERVICES],
            "subscribe": [device_inbox_prefix("*") + ".>", f"$KV.{ASSIGNMENTS_BUCKET}.*",
                          ROOT_LATEST_SUBJECT]}


# The ENROL link carries what the `enrol` user may do: requests to `hub.enrol` toward
# the cluster, their answers back.
ENROL_LINK_PERMISSIONS = ENROL_PERMISSIONS


def site_links(home: Path) -> list[tuple[str, str, str]]:
    """(site name, DEVICES link password, ENROL link password) of every edge site."""
    root = home / SITES_DIR
    if not root.is_dir():
        return []
    out = []
    for directory in sorted(root.iterdir()):
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError, KeyError):
            raw = tomllib.loads((directory / LINK).read_text())
            out.append((directory.name, str(raw["password"]), str(raw["enrol_password"])))
    return out


def _link_users(home: Path) -> tuple[list[str], list[str]]:
    """The sites' link user blocks: (those in DEVICES, those in ENROL)."""
    devices, enrol = [], []
    for name, password, enrol_password in site_links(home):
        devices.append(f"    # the leaf link of edge site {name} (hub site add)\n" + _user_block(
            f"user: {json.dumps(site_user(name))}, password: {json.dumps(password)}, "
            'allowed_connection_types: ["LEAFNODE"]', site_link_permissions()))
        enrol.append(f"    # the enrolment link of edge site {name}\n" + _user_block(
            f"user: {json.dumps(site_enrol_user(name))}, password: "
            f"{json.dumps(enrol_password)}, allowed_connection_types: [\"LEAFNODE\"]",
            ENROL_LINK_PERMISSIONS))
    return devices, enrol


def _user_block(head: str, perms: dict[str, list[str]] | None) -> str:
    if perms is None:
        return f"    {{ {head} }}"
    pub = ", ".join(json.dumps(s) for s in perms["publish"])
    sub = ", ".join(json.dumps(s) for s in perms["subscribe"])
    return (f"    {{ {head},\n      permissions: {{\n        publish: {{ allow: [{pub}] }},\n"
            f"        subscribe: {{ allow: [{sub}] }} }} }}")


def _account_block(name: str, users: list[str], extra: list[str]) -> str:
    """One account of the `accounts {}` block: `extra` lines, then its users."""
    lines = [f"  {name} {{", *extra, "    users: ["]
    return "\n".join(lines) + "\n" + ",\n".join(users) + "\n    ]\n  }\n"


def _exports_and_imports() -> tuple[list[str], dict[str, list[str]]]:
    """HUB's `exports` lines and every other account's `imports` lines."""
    exports: list[str] = []
    imports: dict[str, list[str]] = {}
    for kind, subject, accounts in hub_exports():
        names = ", ".join(accounts)
        exports.append(f"      {{ {kind}: {json.dumps(subject)}, accounts: [{names}] }}")
        for account in accounts:
            imports.setdefault(account, []).append(
                f"      {{ {kind}: {{ account: {HUB_ACCOUNT}, subject: {json.dumps(subject)} }}"
                " }")
    return exports, imports


def accounts_text(hub: str, witness: str | None, operators: list[str], devices: list[str],
                  probe: str, enrol: str | None = None,
                  enrol_links: list[str] | None = None) -> str:
    """The users file: an `accounts {}` block with these user blocks in their accounts
    (`devices` and `enrol_links`: edge sites' leaf link users too)."""
    exports, imports = _exports_and_imports()

    def io(account: str) -> list[str]:
        return ["    imports: [", *imports.get(account, []), "    ]"]

    blocks = [
        _account_block(HUB_ACCOUNT, [hub],
                       ["    jetstream: enabled", "    exports: [", *exports, "    ]"]),
        _account_block(OPERATORS_ACCOUNT, operators, io(OPERATORS_ACCOUNT)),
        _account_block(DEVICES_ACCOUNT, devices, io(DEVICES_ACCOUNT)),
    ]
    if witness is not None:
        blocks.append(_account_block(WITNESS_ACCOUNT, [witness], io(WITNESS_ACCOUNT)))
    if enrol is not None:
        blocks.append(_account_block(ENROL_ACCOUNT, [enrol, *(enrol_links or [])],
                                     io(ENROL_ACCOUNT)))
    blocks.append(_account_block(PROBE_ACCOUNT, [probe], []))
    return ("# NATS accounts and users (rewritten by the hub when devices or operators "
            "change)\naccounts {\n" + "".join(blocks) + "}\n")


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


def write_users(home: Path, devices: Iterable[tuple[str, bytes]],
                operators: Iterable[tuple[str, bytes]] = ()) -> bool:
    """Rewrite users.conf: the password users, one nkey user per (device, public) and one
    per (operator key id, public), two leaf link users per edge site; and each edge
    site's own users file (its devices). False (and users.conf not written) when it
    already says that, so the server need not reload."""
    passwords = load_credentials(home)
    if not passwords:
        return False  # this home has no NATS identities (created without them)

    def password_user(role: str, perms: dict[str, list[str]] | None) -> str:
        return _user_block(f"user: {json.dumps(role)}, password: "
                           f"{json.dumps(passwords[role])}", perms)

    operator_users = [f"    # operator key {keyid}\n" + _user_block(
        f"nkey: {json.dumps(nkey_public(public))}", operator_permissions(keyid))
        for keyid, public in sorted(operators)]
    device_users = [f"    # device {device}\n" + _user_block(
        f"nkey: {json.dumps(nkey_public(public))}", device_permissions(device))
        for device, public in sorted(devices)]
    enrol_user = password_user("enrol", ENROL_PERMISSIONS) if "enrol" in passwords else None
    device_links, enrol_links = _link_users(home)
    _write_site_users(home, device_users, enrol_user)
    _write_private(nats_dir(home) / IDENTITIES, json.dumps({
        "devices": [[d, p.hex()] for d, p in sorted(devices)],
        "operators": [[k, p.hex()] for k, p in sorted(operators)]}) + "\n")
    seed, probe = new_probe()  # proves, once the server lets it in, that it runs this file
    text = accounts_text(
        password_user("hub", None),
        password_user("witness", WITNESS_PERMISSIONS) if "witness" in passwords else None,
        operator_users, device_users + device_links, probe, enrol_user, enrol_links)
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


def site_users_text(device_users: list[str], enrol_user: str | None) -> str:
    """An edge site's leaf authenticates its devices itself, in accounts of the same
    names as the cluster's that its links bind to: DEVICES (every device, with the same
    per-device permissions as on the cluster) and ENROL (the shared `enrol` user). No
    hub, witness or operator identity (none of them connects at a site, and a site box
    is less guarded), no JetStream, no imports: what a device there may reach is what
    crosses the link into the cluster's account of the same name."""
    blocks = [_account_block(DEVICES_ACCOUNT, device_users, [])]
    if enrol_user is not None:
        blocks.append(_account_block(ENROL_ACCOUNT, [enrol_user], []))
    return ("# NATS accounts and users of an edge site's leaf node (rewritten by the hub "
            "when devices change;\n# copy it to a leaf on another machine and reload it)\n"
            "accounts {\n" + "".join(blocks) + "}\n")


def _write_site_users(home: Path, device_users: list[str], enrol_user: str | None) -> None:
    root = home / SITES_DIR
    if not root.is_dir():
        return
    text = site_users_text(device_users, enrol_user)
    for directory in sorted(root.iterdir()):
        path = directory / USERS_CONF
        if not (directory / LINK).exists():
            continue
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
        raw = {"devices": [], "operators": []}  # a home older than that file
        log.warning("%s: no %s yet: users.conf written with no devices or operators "
                    "until `hub serve` starts", home, IDENTITIES)
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
