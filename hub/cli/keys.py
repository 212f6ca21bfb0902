"""`hub keys show|rotate|revoke` and `hub device history` (registered by hub/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edge_agent.protocol.documents import ProtocolError, StatusReport, read_report
from hub.cli import (
    EXIT_REFUSED,
    HOME,
    JSON,
    KEY,
    NATS_URL,
    TIMEOUT,
    _call,
    _config,
    _print_json,
    _time,
    app,
    device_app,
    out,
)
from hub.devices.reads import report_signature

keys_app = typer.Typer(
    help="The trust root devices pin: its keys per role, rotation and revocation. Devices "
    "fetch each new root version and accept it only if the old and the new root keys "
    "signed it.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("show")
def keys_show(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
              as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """The current trust root: per role its key ids, threshold, expiry and version.
    Keys the hub holds are marked *; log and witness keys show their note key name."""
    result = _call(_config(home, nats_url), key, timeout, "keys")
    if as_json:
        _print_json({k: v for k, v in result.items() if k != "root"})
        return
    table = Table("role", "key ids (* = held by the hub)", "threshold", "expires (UTC)",
                  "root version", title=f"trust root version {result['version']}")
    for r in result["roles"]:
        names = r.get("names", {})
        ids = "\n".join(f"{k}{' *' if k in r['held'] else ''}"
                        f"{' ' + names[k] if k in names else ''}" for k in r["keyids"])
        table.add_row(r["role"], ids, str(r["threshold"]), _time(result["expires"]),
                      str(result["version"]))
    out.print(table)


@keys_app.command("rotate")
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
    result = _call(_config(home, nats_url), key, timeout, "keys.rotate", body)
    if as_json:
        _print_json(result)
        return
    out.print(f"trust root version {result['version']}: new {role} key {result['keyid']} "
              f"(HOME/keys/{result['key_file']}), threshold {result['threshold']}")
    out.print("devices pick it up from the KV bucket `roots`; revoke the old key with "
              "`hub keys revoke KEYID` (see `hub keys show`)")


@keys_app.command("revoke")
def keys_revoke(
    keyid: str = typer.Argument(..., help="Key id to remove (see `hub keys show`)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Remove a key from its role (admin role) in trust root N+1. For a release or director
    key the hub re-signs every live release manifest and every device's current assignment
    with the remaining keys, so devices keep working and refuse anything the revoked key
    signs."""
    result = _call(_config(home, nats_url), key, timeout, "keys.revoke", {"keyid": keyid})
    if as_json:
        _print_json(result)
        return
    out.print(f"trust root version {result['version']}: {result['role']} key {keyid} revoked; "
              f"re-signed {result['resigned_manifests']} manifest(s) and "
              f"{result['resigned_assignments']} assignment(s)")


witness_app = typer.Typer(
    help="Witnesses: the cosigners devices require with `edge-agent run --require-inclusion` "
    "(model transparency). Their keys are in the trust root's witness role.",
    no_args_is_help=True,
)
app.add_typer(witness_app, name="witness")


@witness_app.command("add")
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
    its cosignatures (HOME/witnesses) and devices walk to the new root."""
    body: dict[str, Any] = {"name": name, "pubkey": pubkey}
    if threshold is not None:
        body["threshold"] = threshold
    result = _call(_config(home, nats_url), key, timeout, "witness.add", body)
    if as_json:
        _print_json(result)
        return
    out.print(f"trust root version {result['version']}: witness {name} (key "
              f"{result['keyid']}) added; devices requiring inclusion need "
              f"{result['threshold']} cosignature(s)")


@witness_app.command("remove")
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
    replacement first), and the threshold is lowered only when you say so."""
    body: dict[str, Any] = {"name": name}
    if threshold is not None:
        body["threshold"] = threshold
    result = _call(_config(home, nats_url), key, timeout, "witness.remove", body)
    if as_json:
        _print_json(result)
        return
    out.print(f"trust root version {result['version']}: witness {name} (key "
              f"{result['keyid']}) removed; devices requiring inclusion need "
              f"{result['threshold']} cosignature(s)")


@witness_app.command("list")
def witness_list(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
                 as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """The witnesses in the current trust root: name, key id, and how many cosignatures
    devices running with --require-inclusion need."""
    result = _call(_config(home, nats_url), key, timeout, "keys")
    role = next((r for r in result["roles"] if r["role"] == "witness"), None)
    names = role.get("names", {}) if role else {}
    rows = [{"name": names.get(k, ""), "keyid": k} for k in (role["keyids"] if role else [])]
    threshold = role["threshold"] if role else 0
    if as_json:
        _print_json({"version": result["version"], "threshold": threshold,
                     "witnesses": rows})
        return
    if not rows:
        out.print(f"trust root version {result['version']} names no witness; add one with "
                  "`hub witness add NAME --pubkey VKEY`")
        return
    table = Table("name", "key id", title=f"witnesses in trust root version "
                  f"{result['version']} (devices need {threshold} cosignature(s))")
    for row in rows:
        table.add_row(row["name"], row["keyid"])
    out.print(table)


@device_app.command("history")
def device_history(
    device_id: str = typer.Argument(..., help="Device id."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """What the device said it ran, and when: every ledger event about it, with each
    status report's device signature checked here against the key enrolled in the
    ledger. Exit 1 if any signature does not check."""
    result = _call(_config(home, nats_url), key, timeout, "device.history",
                   {"device": device_id})
    public = result["public"]
    rows = []
    for e in result["events"]:
        p = e["payload"]
        when, signature = e["ts"], "n/a (operator)" if "command" in p else "n/a (hub)"
        if "report" in p or e["actor"] == device_id:
            signature = report_signature(p, public)
            try:
                report = read_report(p["report"])[0] if "report" in p else None
            except ProtocolError:
                report = None
            if isinstance(report, StatusReport):
                when = report.ts
        ref = f"{p.get('model')}/{p.get('version')}" if p.get("model") else "-"
        rows.append({"seq": e["seq"], "time": _time(when), "event": e["kind"], "model": ref,
                     "digest": str(p.get("digest", ""))[:16], "counter": p.get("counter"),
                     "signature": signature})
    if as_json:
        _print_json(rows)
    else:
        table = Table("seq", "time (UTC)", "event", "model", "digest", "counter", "signature",
                      title=f"history of {device_id} (times of device events: as signed)")
        for r in rows:
            style = "red" if r["signature"] in ("INVALID", "unsigned") else None
            table.add_row(str(r["seq"]), r["time"], r["event"], r["model"], r["digest"],
                          "-" if r["counter"] is None else str(r["counter"]), r["signature"],
                          style=style)
        out.print(table)
    if any(r["signature"] in ("INVALID", "unsigned") for r in rows):
        raise typer.Exit(EXIT_REFUSED)
