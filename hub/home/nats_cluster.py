"""A NATS cluster for the hub (`hub init --cluster N`, docs/OPERATIONS.md).

One nats-server configuration per node, HOME/nats/node-I.conf, beside the single
server's users.conf, which every node includes: the same `accounts {}` block (HUB with
JetStream, OPERATORS, DEVICES, WITNESS, ENROL, PROBE and their exports and imports) on
every node. nats-server does not carry statically configured accounts over routes;
each node reads them from its own copy of the file, and routes then carry every
account's messages and interest, imports and exports included. The hub rewrites
users.conf and SIGHUPs every node that runs on its machine (hub.home.nats_config
.reload_server); a node on another machine gets the file copied and is reloaded by its
operator.

Each node has its own JetStream store directory, a route password shared by the
nodes (a server that does not know it cannot join), and a `leafnodes` listener for
edge sites (`hub site add`, hub/home/sites.py). JetStream runs only in HUB; its
streams and buckets get 3 replicas when the cluster has 3+ nodes (config.toml
`nats_replicas`, hub/service/nats.py). No JetStream domain: devices, also those
behind a site's leaf node, make no JetStream API call beyond the direct gets their
account imports from HUB, which cross a leaf link like any other subject.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from hub.home.nats_config import (
    DEVICES_ACCOUNT,
    NODE_CONF,
    NODE_PID,
    TLS_DIR,
    listen_address,
    nats_dir,
)
from ledger.durable import atomic_write

CLUSTER_NAME = "fleetledger"
CLUSTER_PORT = 6222  # nats-server's usual route port
LEAF_PORT = 7422  # nats-server's usual leaf node port
ROUTE_USER = "route"
# nats-server denies `$JS.API.>`, `$KV.>` and `$OBJ.>` across every leaf link of an
# account unless the account is mapped to the default (empty) JetStream domain here
# (and on the leaf): devices behind a site's leaf node need exactly those subjects
# (their direct gets, the assignment and root hints). DEVICES has no JetStream of its
# own either side: what those subjects reach is DEVICES' imports from HUB, the same as
# for a directly connected device (and the link user's permissions narrow the link to
# them, hub.home.nats_config.site_link_permissions).
NO_LEAF_JS_DENY = [
    "# DEVICES' direct gets and hints cross edge sites' leaf links (hub/home/nats_cluster.py)",
    f"default_js_domain: {{ {DEVICES_ACCOUNT}: \"\" }}",
]


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
    the same identities and the same `accounts {}`: static accounts are not carried by
    routes, each node reads them from its own file):
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
            "jetstream { store_dir: "
            f"{json.dumps(str((directory / node.name).resolve()))} }}",
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
            *NO_LEAF_JS_DENY,
            "include users.conf",
        ]
        if tls:
            tls_dir = directory / TLS_DIR
            lines += ["tls {",
                      f"  cert_file: {json.dumps(str((tls_dir / 'server.pem').resolve()))}",
                      f"  key_file: {json.dumps(str((tls_dir / 'server.key').resolve()))}",
                      "  timeout: 2", "}"]
        path = node_conf_path(home, node.index)
        atomic_write(path, ("\n".join(lines) + "\n").encode(), 0o600)
        paths.append(path)
    return paths


