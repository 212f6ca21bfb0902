"""`hub site add`: an edge site's leaf nats-server configuration (hub/home/sites.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from hub.cli._common import HOME, JSON, examples, out, show

site_app = typer.Typer(
    help="Edge sites: a leaf NATS server at a site that its devices connect to, linked "
         "to the hub's NATS cluster; devices keep serving while the site is cut off.",
    no_args_is_help=True,
    epilog=examples("hub site add plant-a --listen 0.0.0.0:4222 --home hub-home"))


@site_app.command("add", epilog=examples(
    "hub site add plant-a --listen 0.0.0.0:4222 --home hub-home",
    "hub site add lab --listen 127.0.0.1:14222 --home hub-home --json",
    "hub site add plant-b --listen 10.1.0.5:4222 --uplink nats-leaf://hub.example:7422 "
    "--home hub-home",
))
def site_add(
    name: str = typer.Argument(..., help="Site name: letters, digits, '-' or '_'."),
    listen: str = typer.Option(..., "--listen", metavar="HOST:PORT",
                               help="Where the site's devices connect to the leaf node."),
    uplink: str | None = typer.Option(
        None, "--uplink", metavar="URL,...", help="The cluster's leaf node URLs as the "
        "site reaches them (default: every node's leafnodes listen address in "
        "HOME/nats/node-*.conf)."),
    home: Path = HOME, as_json: bool = JSON,
) -> None:
    """Write HOME/sites/NAME/: leaf.conf (run it with `nats-server -c` at the site),
    users.conf (the devices' users, kept current by the hub) and link.toml (the links'
    passwords); add the site's two leaf-only link users to HOME/nats/users.conf and
    reload the servers that run on this machine. Devices at the site run with
    `edge-agent run --nats nats://HOST:PORT` (nothing else changes for them: they land in
    the cluster's DEVICES account with a direct device's rights). Exit 2 on a bad name,
    address or home."""
    from hub.home.config import load_config
    from hub.home.nats_config import (
        DEVICES_ACCOUNT,
        ENROL_ACCOUNT,
        site_enrol_user,
        site_user,
    )
    from hub.home.sites import add_site

    load_config(home)  # a hub home, or exit 2
    uplinks = [u.strip() for u in uplink.split(",") if u.strip()] if uplink else None
    site = add_site(home, name, listen, uplinks)
    result: dict[str, object] = {
        "site": name, "leaf_conf": str(site.leaf_conf), "users_conf": str(site.users_conf),
        "devices_url": f"nats://{listen}", "uplinks": site.uplinks,
        "links": [{"user": site_user(name), "account": DEVICES_ACCOUNT},
                  {"user": site_enrol_user(name), "account": ENROL_ACCOUNT}]}

    def render(r: dict[str, object]) -> None:
        out.print(f"site {name}: leaf node configuration {r['leaf_conf']}")
        out.print(f"  run at the site: nats-server -c {r['leaf_conf']} (with {r['users_conf']} "
                  "beside it; copy it again when devices change)", soft_wrap=True)
        out.print(f"  devices there: edge-agent run --nats {r['devices_url']} ...",
                  soft_wrap=True)
        out.print(f"  linked to {', '.join(site.uplinks)} as leaf-only users {site_user(name)} "
                  f"(account {DEVICES_ACCOUNT}) and {site_enrol_user(name)} "
                  f"({ENROL_ACCOUNT})", soft_wrap=True)

    show(result, as_json, render)
