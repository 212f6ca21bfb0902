"""`hub keys show|rotate|revoke` and `hub witness add|remove|list`: the trust root's keys.
The offline root key's `hub keys root ...` commands are in offline_root.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from hub.cli._common import (
    HOME,
    JSON,
    KEY,
    NATS_URL,
    TIMEOUT,
    call,
    examples,
    hub_config,
    key_column,
    out,
    rfc3339,
    show,
    utc_time,
)

keys_app = typer.Typer(
    help="The trust root devices pin: its keys per role, rotation and revocation. Devices "
    "fetch each new root version and accept it only if the old and the new root keys "
    "signed it.",
    no_args_is_help=True,
    epilog=examples(
    'hub keys show --home hub-home',
    'hub keys rotate director --home hub-home',
    'hub keys revoke KEYID --home hub-home',
    'hub keys root prepare --rotate log --out root-3.json --home hub-home',
),
)

@keys_app.command("show", epilog=examples(
    'hub keys show --home hub-home',
    'hub keys show --home hub-home --json',
))
def keys_show(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
              as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """The current trust root: per role its key ids, threshold, expiry and version.
    Keys the hub holds are marked *; log and witness keys show their note key name.
    Every log key the hub ever had is listed with its vkey (HOME/log-keys), revoked
    ones too: `ledger verify --log-key` takes any of them."""
    result = call(hub_config(home, nats_url), key, timeout, "keys")

    def render(_: dict[str, Any]) -> None:
        table = Table("role", key_column("key ids (* = held by the hub)", 34), "threshold",
                      "expires (UTC)", "root version",
                      title=f"trust root version {result['version']}")
        for r in result["roles"]:
            names = r.get("names", {})
            # One key id a line, whole (`hub keys revoke` needs it); its name below it.
            ids = "\n".join(f"{k}{' *' if k in r['held'] else ''}"
                            f"{chr(10) + '  ' + names[k] if k in names else ''}"
                            for k in r["keyids"])
            table.add_row(r["role"], ids, str(r["threshold"]), utc_time(result["expires"]),
                          str(result["version"]))
        out.print(table)
        if result.get("log_keys"):
            # Every log key the hub ever had (HOME/log-keys): auditors of old checkpoints.
            kept = Table("log key id", "vkey (HOME/log-keys/<keyid>.vkey)", "state",
                         title="log keys, current and revoked")
            for k in result["log_keys"]:
                kept.add_row(k["keyid"], k["vkey"], "revoked" if k["revoked"] else "current")
            out.print(kept)

    # The signed root itself (bytes) stays out of the JSON.
    doc = {k: v for k, v in result.items() if k != "root"}
    if as_json:  # RFC 3339, with the nanoseconds kept as expires_ts
        doc = {**doc, "expires": rfc3339(result["expires"]), "expires_ts": result["expires"]}
    show(doc, as_json, render)


@keys_app.command("rotate", epilog=examples(
    'hub keys rotate director --home hub-home',
    'hub keys rotate log --home hub-home',
    'hub keys rotate release --threshold 1 --home hub-home',
))
def keys_rotate(
    role: str = typer.Argument(..., help="root, release, director or log."),
    threshold: int | None = typer.Option(
        None, "--threshold", help="New threshold for the role (default: unchanged)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Add a new key to ROLE (admin role): the hub writes it under HOME/keys, makes trust
    root N+1 signed by the old and new root keys, records it in the ledger and publishes
    it to the devices. The hub signs with the new key from then on; the old key stays
    valid until you `hub keys revoke` it."""
    body: dict[str, Any] = {"role": role}
    if threshold is not None:
        body["threshold"] = threshold

    def render(result: dict[str, Any]) -> None:
        out.print(f"trust root version {result['version']}: new {role} key "
                  f"{result['keyid']} (HOME/keys/{result['key_file']}), threshold "
                  f"{result['threshold']}")
        out.print("devices pick it up from the KV bucket `roots`; revoke the old key with "
                  "`hub keys revoke KEYID` (see `hub keys show`)")

    show(call(hub_config(home, nats_url), key, timeout, "keys.rotate", body), as_json, render)


@keys_app.command("revoke", epilog=examples(
    'hub keys show --home hub-home    (the full key ids)',
    'hub keys revoke 1be27cea36ab6045f4b4176ac3c74d59 --home hub-home',
))
def keys_revoke(
    keyid: str = typer.Argument(..., help="Key id to remove (see `hub keys show`)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Remove a key from its role (admin role) in trust root N+1. For a release or director
    key the hub re-signs every live release manifest and every device's current assignment
    with the remaining keys, so devices keep working and refuse anything the revoked key
    signs."""
    result = call(hub_config(home, nats_url), key, timeout, "keys.revoke", {"keyid": keyid})
    # --json: null, not "", when no key file went with the key (HOME/keys/<file>).
    show({**result, "key_file": result.get("key_file") or None}, as_json, lambda r: out.print(
             f"trust root version {r['version']}: {r['role']} key {keyid} revoked; "
             f"re-signed {r['resigned_manifests']} manifest(s) and "
             f"{r['resigned_assignments']} assignment(s)"))


witness_app = typer.Typer(
    help="Witnesses: the cosigners devices require with `edge-agent run --require-inclusion` "
    "(model transparency). Their keys are in the trust root's witness role.",
    no_args_is_help=True,
    epilog=examples(
    'ledger witness-key --out w1.key --name witness.example/w1',
    'hub witness add witness.example/w1 --pubkey "$(cat w1.key.vkey)" --home hub-home',
    'hub witness list --home hub-home',
),
)

@witness_app.command("add", epilog=examples(
    'ledger witness-key --out w1.key --name witness.example/w1',
    'hub witness add witness.example/w1 --pubkey "$(cat w1.key.vkey)" --home hub-home',
))
def witness_add(
    name: str = typer.Argument(..., help="The witness's key name (as in its vkey)."),
    pubkey: str = typer.Option(
        ..., "--pubkey", help="Its Ed25519 public key: 64 hex digits, or the vkey that "
        "`ledger witness-key` printed."),
    threshold: int | None = typer.Option(
        None, "--threshold", help="Cosignatures devices require (default: unchanged, 1 "
        "for the first witness)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Add a witness key to the trust root (admin role): trust root N+1 lists it in the
    witness role under NAME (and names the log key with the hub's origin), the hub stores
    its cosignatures (HOME/witnesses) and devices walk to the new root. With the root key
    offline: `hub keys root prepare --add-witness NAME --pubkey KEY`, sign, import."""
    body: dict[str, Any] = {"name": name, "pubkey": pubkey}
    if threshold is not None:
        body["threshold"] = threshold
    show(call(hub_config(home, nats_url), key, timeout, "witness.add", body), as_json,
         lambda r: out.print(f"trust root version {r['version']}: witness {name} (key "
                             f"{r['keyid']}) added; devices requiring inclusion need "
                             f"{r['threshold']} cosignature(s)"))


@witness_app.command("remove", epilog=examples(
    'hub witness remove witness.example/w1 --home hub-home',
    'hub witness remove witness.example/w2 --threshold 1 --home hub-home',
))
def witness_remove(
    name: str = typer.Argument(..., help="The witness's key name (see `hub witness list`)."),
    threshold: int | None = typer.Option(
        None, "--threshold", help="Cosignatures devices require from then on (default: "
        "unchanged; needed when fewer witnesses than that would be left)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Remove a witness (admin role), e.g. one whose key leaked or that stopped
    cosigning: trust root N+1 no longer lists it, devices stop counting its cosignatures
    and the hub stops storing them. The last witness cannot be removed (add its
    replacement first), and the threshold is lowered only when you say so. With the root
    key offline: `hub keys root prepare --remove-witness NAME`, sign, import."""
    body: dict[str, Any] = {"name": name}
    if threshold is not None:
        body["threshold"] = threshold
    show(call(hub_config(home, nats_url), key, timeout, "witness.remove", body), as_json,
         lambda r: out.print(f"trust root version {r['version']}: witness {name} (key "
                             f"{r['keyid']}) removed; devices requiring inclusion need "
                             f"{r['threshold']} cosignature(s)"))


@witness_app.command("list", epilog=examples(
    'hub witness list --home hub-home',
    'hub witness list --json --home hub-home',
))
def witness_list(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
                 as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """The witnesses in the current trust root: name, key id, and how many cosignatures
    devices running with --require-inclusion need."""
    result = call(hub_config(home, nats_url), key, timeout, "keys")
    role = next((r for r in result["roles"] if r["role"] == "witness"), None)
    names = role.get("names", {}) if role else {}
    rows = [{"name": names.get(k, ""), "keyid": k} for k in (role["keyids"] if role else [])]
    threshold = role["threshold"] if role else 0

    def render(_: dict[str, Any]) -> None:
        if not rows:
            out.print(f"trust root version {result['version']} names no witness; add one "
                      "with `hub witness add NAME --pubkey VKEY`")
            return
        table = Table("name", key_column("key id", 32), title=f"witnesses in trust root version "
                      f"{result['version']} (devices need {threshold} cosignature(s))")
        for row in rows:
            table.add_row(row["name"], row["keyid"])
        out.print(table)

    show({"version": result["version"], "threshold": threshold, "witnesses": rows}, as_json,
         render)
