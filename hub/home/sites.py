"""Edge sites: a leaf nats-server at a site that its devices connect to, linked to the
hub's NATS cluster (docs/OPERATIONS.md "Adding an edge site").

`hub site add NAME --listen HOST:PORT` writes

    HOME/sites/NAME/leaf.conf     the leaf node: `listen` for the site's devices, no
                                  JetStream of its own, `leafnodes { remotes }` to the
                                  cluster nodes' leaf ports (or --uplink URLs): one remote
                                  per account, DEVICES and ENROL, each bound to the
                                  cluster's account of the same name
    HOME/sites/NAME/users.conf    the leaf's accounts: DEVICES with every device's user
                                  (the same per-device permissions as on the cluster),
                                  ENROL with the shared `enrol` user (0600)
    HOME/sites/NAME/link.toml     the passwords the leaf links with (0600)

and adds the site's two link users to HOME/nats/users.conf: `site-NAME` in DEVICES and
`site-NAME-enrol` in ENROL, each allowed to connect only as a leaf node, whose
permissions are exactly what crosses the link (hub.home.nats_config
.site_link_permissions). A device at the site so lands in the cluster's DEVICES account
and gets exactly DEVICES' imports (direct gets, its reports, hints): what a directly
connected device gets, and nothing else. The hub rewrites both users files whenever a
device is enrolled or revoked (hub.home.nats_config.write_users) and reloads the
servers that run on its machine; a leaf on another machine gets its users.conf copied
and is reloaded by its operator.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from hub.errors import UsageError
from hub.home.nats_cluster import NO_LEAF_JS_DENY
from hub.home.nats_config import (
    DEVICES_ACCOUNT,
    ENROL_ACCOUNT,
    LEAF_PID,
    LINK,
    NODE_CONF,
    SITES_DIR,
    USERS_CONF,
    ca_path,
    listen_address,
    load_credentials,
    nats_dir,
    rewrite_users,
    site_enrol_user,
    site_user,
)
from ledger.durable import atomic_write

LEAF_CONF = "leaf.conf"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_LEAF_LISTEN = re.compile(r'^leafnodes\s*\{\s*listen:\s*"([^"]+)"', re.M)


@dataclass(frozen=True)
class Site:
    name: str
    directory: Path
    uplinks: list[str]  # the cluster's leaf node URLs the leaf links to (no password)

    @property
    def leaf_conf(self) -> Path:
        return self.directory / LEAF_CONF

    @property
    def users_conf(self) -> Path:
        return self.directory / USERS_CONF


def cluster_leaf_urls(home: Path) -> list[str]:
    """The leaf node listen address of every cluster node (HOME/nats/node-*.conf)."""
    urls = []
    for conf in sorted(nats_dir(home).glob(NODE_CONF.format("*"))):
        match = _LEAF_LISTEN.search(conf.read_text())
        if match:
            urls.append(f"nats-leaf://{match.group(1)}")
    return urls


def add_site(home: Path, name: str, listen: str, uplinks: list[str] | None = None) -> Site:
    """Write the site's leaf configuration, users and link password; add its link user
    to the cluster's users.conf and reload the servers that run here."""
    if not _NAME.match(name):
        raise UsageError(f"site name {name!r}: letters, digits, '-' or '_' (up to 63)")
    if not (nats_dir(home) / USERS_CONF).exists():
        raise UsageError(f"{home} has no NATS identities (made with --no-auth?)")
    try:
        address = listen_address(listen)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    remotes = uplinks or cluster_leaf_urls(home)
    if not remotes:
        raise UsageError(f"{home} has no cluster configuration to link to: make the home "
                         "with `hub init --cluster N`, or give --uplink URL")
    site = Site(name, home / SITES_DIR / name, remotes)
    if site.leaf_conf.exists():
        raise UsageError(f"site {name} exists already ({site.directory})")
    site.directory.mkdir(parents=True, exist_ok=True)
    site.directory.chmod(0o700)
    password, enrol_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    atomic_write(site.directory / LINK,
                 f"# the leaf link passwords of site {name} (users {site_user(name)} and "
                 f'{site_enrol_user(name)})\npassword = "{password}"\n'
                 f'enrol_password = "{enrol_password}"\n'.encode(), 0o600)
    ca = ca_path(home)

    def remote(user: str, secret: str, account: str) -> list[str]:
        urls = []
        for url in remotes:
            scheme, sep, rest = url.partition("://")
            if not sep:
                scheme, rest = "nats-leaf", url
            urls.append(json.dumps(f"{scheme}://{user}:{secret}@{rest}"))
        lines = ["  {", f"    urls: [{', '.join(urls)}]",
                 f"    # the site's {account} account, linked to the cluster's {account}",
                 f"    account: {account}"]
        if ca is not None:
            lines.append(f"    tls {{ ca_file: {json.dumps(str(ca.resolve()))} }}")
        return [*lines, "  }"]

    lines = [
        f"# The leaf nats-server of edge site {name}, written by `hub site add`.",
        "# The site's devices connect here; it has no JetStream of its own: their",
        "# direct gets and reports cross the link into the cluster's DEVICES account, and",
        "# while the link is down devices keep serving and spool their reports",
        "# (docs/OPERATIONS.md).",
        f"server_name: {json.dumps(f'site-{name}')}",
        f"pid_file: {json.dumps(str((site.directory / LEAF_PID).resolve()))}",
        f"listen: {json.dumps(address)}",
        "leafnodes {",
        "  remotes: [",
        *remote(site_user(name), password, DEVICES_ACCOUNT),
    ]
    if "enrol" in load_credentials(home):
        lines += remote(site_enrol_user(name), enrol_password, ENROL_ACCOUNT)
    lines += ["  ]", "}", *NO_LEAF_JS_DENY, "include users.conf"]
    atomic_write(site.leaf_conf, ("\n".join(lines) + "\n").encode(), 0o600)
    rewrite_users(home)  # the cluster's link user, the site's device users
    return site
