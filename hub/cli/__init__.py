"""`hub`: the operator's command line for the fleetledger control plane."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import signal
import sys
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from hub.client import HubClient, file_digest
from hub.commands.envelope import ROLES, command_actor_and_signature, command_signature_valid
from hub.errors import HubError
from hub.home.config import DEFAULT_HOME_ENV, HomeError, HubConfig, init_home, load_config
from ledger.signing import KeyFileError, SigningKey

T = TypeVar("T")

app = typer.Typer(
    help=(
        "Operate the fleetledger hub: register, validate, approve and release models, enroll "
        "devices, deploy, and watch the fleet. Every command is signed with your operator key "
        "and recorded in the hash-chained ledger (check it with `ledger verify`).\n\n"
        "Start with `hub init DIR`, then `hub serve --home DIR`. The lifecycle of a model: "
        "register -> validate -> approve (by someone other than the registrant) -> release "
        "-> deploy."
    ),
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(
    help="Model versions: register, validate, approve, release, show, history.",
    no_args_is_help=True,
)
device_app = typer.Typer(help="Enroll devices; what each device said it ran.",
                         no_args_is_help=True)
operator_app = typer.Typer(help="Operators (people) and their roles.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(device_app, name="device")
app.add_typer(operator_app, name="operator")

out = Console()
err = Console(stderr=True)

HOME = typer.Option(
    Path("hub-home"), "--home", envvar=DEFAULT_HOME_ENV,
    help="Hub home directory made by `hub init` (env FLEET_HUB_HOME).",
)
NATS_URL = typer.Option(None, "--nats", help="NATS URL; overrides the one in config.toml.")
KEY = typer.Option(
    None, "--key", envvar="FLEET_OPERATOR_KEY",
    help="Your operator key file (env FLEET_OPERATOR_KEY; default HOME/operators/admin.key).",
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
TIMEOUT = typer.Option(60.0, "--timeout", help="Seconds to wait for the hub to answer.")

EXIT_REFUSED = 1  # the hub refused the command (or validation failed)
EXIT_USAGE = 2  # bad arguments or a missing/invalid home or key
EXIT_UNREACHABLE = 3  # NATS or the hub cannot be reached


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _config(home: Path, nats_url: str | None) -> HubConfig:
    try:
        return load_config(home, nats_url)
    except HomeError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc


def _key(config: HubConfig, key_path: Path | None) -> SigningKey:
    path = key_path or config.operator_key_path("admin")
    try:
        return SigningKey.load(path)
    except KeyFileError as exc:
        raise _fail(f"{exc}; pass your operator key with --key", EXIT_USAGE) from exc


def _run(config: HubConfig, key: Path | None, timeout: float,
         fn: Callable[[HubClient], Awaitable[T]]) -> T:
    signing_key = _key(config, key)

    async def go() -> T:
        async with await HubClient.connect(config.nats_url, signing_key, timeout,
                                           config.operator_auth(signing_key)) as client:
            return await fn(client)

    try:
        return asyncio.run(go())
    except HubError as exc:
        raise _fail(str(exc), exc.exit_code) from exc


def _call(config: HubConfig, key: Path | None, timeout: float, verb: str,
          body: dict[str, Any] | None = None) -> Any:
    return _run(config, key, timeout, lambda c: c.call(verb, body or {}))


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)))


def _time(ts_ns: int | None) -> str:
    if not ts_ns:
        return "-"
    return dt.datetime.fromtimestamp(ts_ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(ts_ns: int | None) -> str:
    if not ts_ns:
        return "never"
    seconds = max(0.0, dt.datetime.now(dt.UTC).timestamp() - ts_ns / 1e9)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return _time(ts_ns)


def _ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("/")
    if not sep or not name or not version:
        raise _fail(f"expected NAME/VERSION, got {ref!r}", EXIT_USAGE)
    return name, version


# ---------------------------------------------------------------- set-up and serving


@app.command()
def init(
    home: Path = typer.Argument(..., help="Directory to create (keys, trust root, config)."),
    nats_url: str = typer.Option("nats://127.0.0.1:4222", "--nats", help="NATS server URL."),
    database: str = typer.Option(
        "ledger.db", "--database", help="SQLite file (relative to DIR) or a database URL, "
        "e.g. postgresql+psycopg://user@127.0.0.1/fleet (the ledger and the hub's tables)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing home's keys."),
    tls: bool = typer.Option(False, "--tls", help="Also make a CA and a server certificate "
                             "for 127.0.0.1/localhost; server and clients then use TLS."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Write no NATS server "
                                 "configuration (a server without users; tests, benchmarks)."),
) -> None:
    """Create a hub home: Ed25519 keys for the root, release, director and log roles, the
    signed trust root that devices pin (DIR/trust-root.bin), the first operator's key
    (DIR/operators/admin.key), a validation policy (DIR/policy.toml) and DIR/config.toml."""
    try:
        config = init_home(home, nats_url, database, force, nats_auth=not no_auth, tls=tls)
    except HomeError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    out.print(f"hub home ready in [bold]{home}[/bold]")
    out.print(f"  trust root for devices: {config.trust_root_path}")
    out.print(f"  log verifier key (for `ledger witness` / `ledger verify --log-key`): "
              f"{config.home / 'log.vkey'}")
    out.print(f"  first operator key (admin): {config.operator_key_path('admin')}")
    out.print(f"  validation policy: {config.policy_path}")
    out.print(f"  ledger: {config.database_url()}")
    if not no_auth:
        out.print(f"  nats-server config (users, permissions{', TLS' if tls else ''}): "
                  f"{home / 'nats' / 'nats-server.conf'}; run nats-server -js -c with it")
    out.print(f"next: hub serve --home {home}")


@app.command()
def serve(
    home: Path = HOME,
    nats_url: str | None = NATS_URL,
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port",
        help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (config.toml "
             "metrics_port; default off)."),
) -> None:
    """Run the hub: create the NATS buckets and streams, answer signed operator commands,
    record device reports in the ledger, and drive rollouts. Stops cleanly on SIGTERM or
    Ctrl-C."""
    from hub.service.app import HubService

    logging.basicConfig(
        level=log_level.upper(), format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    config = _config(home, nats_url)
    if metrics_port is not None:
        config = dataclasses.replace(config, metrics_port=metrics_port)

    async def main() -> None:
        service = HubService(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service.start()
        try:
            await stop.wait()
        finally:
            await service.stop()

    try:
        asyncio.run(main())
    except HomeError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    except OSError as exc:
        raise _fail(f"cannot reach NATS at {config.nats_url}: {exc}", EXIT_UNREACHABLE) from exc


@app.command()
def status(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
           as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """Show the ledger head as the running hub sees it."""
    result = _call(_config(home, nats_url), key, timeout, "status")
    if as_json:
        _print_json(result)
    else:
        out.print(f"ledger: {result['entries']} entries, head {result['head'] or '-'}")
        out.print(f"refused reports since start: {result['refused_reports']}")


@app.command()
def whoami(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
           as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """Show which operator your key is and its roles, as the hub knows them."""
    result = _call(_config(home, nats_url), key, timeout, "whoami")
    if as_json:
        _print_json(result)
    else:
        out.print(f"{result['name']} (key {result['keyid']}): {', '.join(result['roles'])}")


@app.command()
def rebuild(
    home: Path = HOME,
    in_place: bool = typer.Option(
        False, "--in-place", help="Replace the live projection tables (stop the hub first)."
    ),
    as_json: bool = JSON,
) -> None:
    """Replay the ledger into empty tables and compare the state digest with the live one.
    Exit 0 when they are equal, 1 when they differ (the live state is not a fold of the
    ledger)."""
    from hub.rebuild import live_digest, rebuild_digest, rebuild_in_place
    from ledger.errors import LedgerError
    from ledger.storage.store import LedgerStore

    config = _config(home, None)
    try:
        store = LedgerStore.open(config.database_url(), create=False)
    except LedgerError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    with store:
        live = live_digest(store)
        rebuilt, count = rebuild_digest(store)
        if in_place:
            rebuild_in_place(store)
            live = live_digest(store)
    result = {"entries": count, "live": live, "rebuilt": rebuilt, "equal": live == rebuilt}
    if as_json:
        _print_json(result)
    else:
        mark = "[green]equal[/green]" if live == rebuilt else "[red]DIFFERENT[/red]"
        out.print(f"replayed {count} entries; state digest live {live[:16]}…, "
                  f"rebuilt {rebuilt[:16]}…: {mark}")
    if live != rebuilt:
        raise typer.Exit(1)


# ---------------------------------------------------------------- operators


@operator_app.command("add")
def operator_add(
    name: str = typer.Argument(..., help="The person's name, e.g. alice."),
    role: list[str] = typer.Option(..., "--role", help=f"Repeatable: {', '.join(ROLES)}."),
    pubkey: str | None = typer.Option(
        None, "--pubkey", help="Their Ed25519 public key (hex); else a new key is made."
    ),
    key_out: Path | None = typer.Option(
        None, "--out", help="Where to write the new key (default HOME/operators/NAME.key)."
    ),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Add an operator with roles (needs the admin role). Without --pubkey a key file is
    created for them; hand it over privately and have them use it with --key."""
    config = _config(home, nats_url)
    bad = [r for r in role if r not in ROLES]
    if bad:
        raise _fail(f"unknown role(s) {', '.join(bad)}; use {', '.join(ROLES)}", EXIT_USAGE)
    new_path = None
    if pubkey is not None:
        try:
            public = bytes.fromhex(pubkey)
        except ValueError as exc:
            raise _fail("--pubkey must be 64 hex characters", EXIT_USAGE) from exc
    else:
        new_path = key_out or config.operator_key_path(name)
        if new_path.exists():
            raise _fail(f"{new_path} exists; pass --pubkey or another --out", EXIT_USAGE)
        new_key = SigningKey.generate()
        public = new_key.public.raw
    result = _call(config, key, timeout, "operator.add",
                   {"name": name, "public": public, "roles": role})
    if new_path is not None:
        new_key.save(new_path)
        result["key_file"] = str(new_path)
    if as_json:
        _print_json(result)
    else:
        out.print(f"added operator {name} (key {result['keyid']}) with roles "
                  f"{', '.join(result['roles'])}")
        if new_path is not None:
            out.print(f"  their key: {new_path} (give it to them; it signs their commands)")


@operator_app.command("revoke")
def operator_revoke(
    name: str = typer.Argument(..., help="Operator to revoke."),
    reason: str = typer.Option("", "--reason", help="Why, for the record."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    timeout: float = TIMEOUT,
) -> None:
    """Revoke an operator's key (needs admin). Their later commands are refused."""
    result = _call(_config(home, nats_url), key, timeout, "operator.revoke",
                   {"name": name, "reason": reason})
    out.print(f"revoked {name} (key {result['keyid']})")


@operator_app.command("list")
def operator_list(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
                  as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """List operators, their key ids and roles."""
    rows = _call(_config(home, nats_url), key, timeout, "operators")
    if as_json:
        _print_json(rows)
        return
    table = Table("name", "key id", "roles", "status")
    for r in rows:
        table.add_row(r["name"], r["keyid"], ", ".join(r["roles"]),
                      "[red]revoked[/red]" if r["revoked"] else "active")
    out.print(table)


# ---------------------------------------------------------------- models


def _kv_pairs(items: list[str], what: str) -> dict[str, Any]:
    out_map: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise _fail(f"{what} must look like KEY=VALUE, got {item!r}", EXIT_USAGE)
        try:
            out_map[k] = float(v) if "." in v or "e" in v.lower() else int(v)
        except ValueError:
            out_map[k] = v
    return out_map


@model_app.command("register")
def model_register(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The .tflite file."),
    name: str = typer.Option(..., "--name", help="Model name, e.g. kws."),
    version: str = typer.Option(..., "--version", help="Version label, e.g. 3."),
    card_file: Path | None = typer.Option(
        None, "--card", exists=True, dir_okay=False,
        help="TOML with [card] (intended_use, limitations, owners) and [lineage] tables.",
    ),
    intended_use: str | None = typer.Option(None, "--intended-use", help="Model card text."),
    limitation: list[str] = typer.Option([], "--limitation", help="Repeatable."),
    owner: list[str] = typer.Option([], "--owner", help="Repeatable."),
    training_data: str | None = typer.Option(
        None, "--training-data", help="Training data file (hashed here) or its digest."
    ),
    code_ref: str | None = typer.Option(None, "--code-ref", help="e.g. git commit of training."),
    param: list[str] = typer.Option([], "--param", help="Training parameter KEY=VALUE."),
    metric: list[str] = typer.Option([], "--metric", help="Training metric KEY=VALUE."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Upload FILE to the Object Store under its BLAKE3 digest and register it with its
    lineage and model card (needs the registrant role). The hub checks that it loads with
    the TFLite runtime. Next: `hub model validate NAME/VERSION --data FILE.npz`."""
    card: dict[str, Any] = {}
    lineage: dict[str, Any] = {}
    if card_file is not None:
        try:
            doc = tomllib.loads(card_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise _fail(f"{card_file}: {exc}", EXIT_USAGE) from exc
        card, lineage = dict(doc.get("card", {})), dict(doc.get("lineage", {}))
    if intended_use:
        card["intended_use"] = intended_use
    if limitation:
        card["limitations"] = limitation
    if owner:
        card["owners"] = owner
    if training_data:
        path = Path(training_data)
        lineage["training_data_digest"] = (
            file_digest(path)[0] if path.is_file() else training_data
        )
    if code_ref:
        lineage["code_ref"] = code_ref
    if param:
        lineage["params"] = _kv_pairs(param, "--param")
    if metric:
        lineage["metrics"] = _kv_pairs(metric, "--metric")
    config = _config(home, nats_url)
    result = _run(config, key, timeout,
                  lambda c: c.register_model(file, name, version, lineage, card))
    if as_json:
        _print_json(result)
    else:
        out.print(f"registered [bold]{name}/{version}[/bold] digest {result['digest'][:16]}… "
                  f"(ledger seq {result['seq'][0]}); next: hub model validate "
                  f"{name}/{version} --data FILE.npz")


@model_app.command("validate")
def model_validate(
    ref: str = typer.Argument(..., help="NAME/VERSION"),
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False,
                              help=".npz with inputs, optional labels and groups."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = typer.Option(300.0, "--timeout"),
) -> None:
    """Run the validation gate: the hub runs the model with the TFLite runtime on the data
    and checks quality, fairness gap, robustness, latency against HOME/policy.toml. The
    result is recorded either way; exit 1 if it failed."""
    name, version = _ref(ref)
    config = _config(home, nats_url)
    result = _run(config, key, timeout, lambda c: c.validate_model(name, version, data))
    if as_json:
        _print_json(result)
    else:
        _print_metrics(result["metrics"])
        if result["passed"]:
            out.print(f"[green]validation passed[/green] for {ref}; next: hub model approve {ref}"
                      " (by an approver who did not register it)")
        else:
            out.print(f"[red]validation failed[/red] for {ref}:")
            for failure in result["failures"]:
                out.print(f"  - {failure}")
    if not result["passed"]:
        raise typer.Exit(EXIT_REFUSED)


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table("metric", "value", title="validation")
    for k, v in sorted(metrics.items()):
        if isinstance(v, float):
            table.add_row(k, f"{v:.4g}")
        elif isinstance(v, int | str):
            table.add_row(k, str(v))
        elif isinstance(v, dict) and all(isinstance(x, int | float) for x in v.values()):
            table.add_row(k, ", ".join(f"{a}={b:.3g}" for a, b in v.items()))
        elif isinstance(v, list) and all(isinstance(x, int | float) for x in v):
            table.add_row(k, ", ".join(f"{x:.3g}" for x in v))
    out.print(table)


def _transition_command(verb: str, doc: str, reason_needed: bool = False) -> None:
    def command(
        ref: str = typer.Argument(..., help="NAME/VERSION"),
        reason: str = typer.Option("", "--reason", help="Why, for the record."),
        home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
        as_json: bool = JSON, timeout: float = TIMEOUT,
    ) -> None:
        name, version = _ref(ref)
        body: dict[str, Any] = {"name": name, "version": version}
        if reason:
            body["reason"] = reason
        result = _call(_config(home, nats_url), key, timeout, f"model.{verb}", body)
        if as_json:
            _print_json(result)
            return
        extra = ""
        if verb == "approve":
            extra = f" ({result['approvals']} of {result['required']} approvals)"
        out.print(f"{ref}: {result['state']}{extra}")

    command.__doc__ = doc
    model_app.command(verb)(command)


_transition_command("approve", "Approve a validated version (needs the approver role; the "
                    "registrant cannot approve; policy says how many approvals are needed).")
_transition_command("reject", "Reject a version (approver role; --reason required).")
_transition_command("release", "Release an approved version: the hub signs its release "
                    "manifest and publishes it for devices (operator role).")
_transition_command("deprecate", "Mark a released version deprecated (operator role).")
_transition_command("revoke", "Revoke a version; it can no longer be deployed (--reason).")


@model_app.command("list")
def model_list(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
               as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """List registered model versions and where each is in its lifecycle."""
    rows = _call(_config(home, nats_url), key, timeout, "models")
    if as_json:
        _print_json(rows)
        return
    table = Table("model", "version", "state", "approvals", "size", "digest")
    for r in rows:
        table.add_row(r["name"], r["version"], r["state"],
                      f"{len(r['approvals'])}/{r['approvals_required']}", f"{r['size']:,}",
                      r["digest"][:16])
    out.print(table)


@model_app.command("show")
def model_show(
    ref: str = typer.Argument(..., help="NAME or NAME/VERSION"),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Render the model card: intended use, limitations, owners, lineage, validation
    numbers (with feature importance) and approvals."""
    name, _, version = ref.partition("/")
    body: dict[str, Any] = {"name": name}
    if version:
        body["version"] = version
    rows = _call(_config(home, nats_url), key, timeout, "model.show", body)
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        card, lineage, validation = r["card"], r["lineage"], r["validation"]
        out.rule(f"[bold]{r['name']}/{r['version']}[/bold] — {r['state']}")
        out.print(f"digest {r['digest']}  size {r['size']:,} bytes")
        out.print(f"intended use: {card.get('intended_use', '-')}")
        for item in card.get("limitations", []) or []:
            out.print(f"limitation: {item}")
        out.print(f"owners: {', '.join(card.get('owners', []) or ['-'])}")
        for k, v in sorted(lineage.items()):
            out.print(f"lineage {k}: {v}")
        if validation:
            verdict = "passed" if validation.get("passed") else "failed"
            out.print(f"validation: {verdict}; failures: {validation.get('failures') or 'none'}")
            _print_metrics(validation.get("metrics", {}))
        out.print(f"approvals: {len(r['approvals'])}/{r['approvals_required']}")


@model_app.command("history")
def model_history(
    name: str = typer.Argument(..., help="Model name."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Every ledger event about a model: who did what and when, and whether each
    operator's signature checks (verified here, with the operators' public keys)."""
    result = _call(_config(home, nats_url), key, timeout, "model.history", {"name": name})
    keys = {o["keyid"]: o for o in result["operators"]}
    rows = []
    for e in result["events"]:
        command = e["payload"].get("command")
        who = keys.get(e["actor"], {}).get("name", e["actor"])
        if isinstance(command, bytes):
            try:
                signer = command_actor_and_signature(command)[0]
            except ValueError:
                signer = ""
            op = keys.get(signer)
            valid = (op is not None and signer == e["actor"]
                     and command_signature_valid(command, op["public"]))
            signature = "valid" if valid else "INVALID"
        else:
            signature = "n/a (hub)" if e["actor"] == "hub" else "unsigned"
        rows.append({"seq": e["seq"], "time": _time(e["ts"]), "event": e["kind"],
                     "model": e["subject"].removeprefix("model:"), "actor": who,
                     "signature": signature})
    if as_json:
        _print_json(rows)
    else:
        table = Table("seq", "time (UTC)", "event", "model", "actor", "signature",
                      title=f"history of {name}")
        for r in rows:
            style = "red" if r["signature"] == "INVALID" else None
            table.add_row(str(r["seq"]), r["time"], r["event"], r["model"], r["actor"],
                          r["signature"], style=style)
        out.print(table)
    if any(r["signature"] == "INVALID" for r in rows):
        raise typer.Exit(EXIT_REFUSED)


# ---------------------------------------------------------------- devices


@device_app.command("enroll")
def device_enroll(
    device_id: str = typer.Argument(..., help="Device id: letters, digits, '-' or '_'."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Enroll a device so it can be deployed to. The hub makes the device's own key (it
    signs the device's status reports) and writes a device bundle, HOME/devices/ID/
    (device.toml, device.key, trust-root.bin): copy it to the device."""
    config = _config(home, nats_url)
    result = _call(config, key, timeout, "device.enroll", {"device": device_id})
    if as_json:
        _print_json(result)
    else:
        out.print(f"enrolled {device_id} (ledger seq {result['seq'][0]}, device key "
                  f"{result['keyid']}); bundle in {result['bundle']}; start it with:")
        out.print(f"  edge-agent run --bundle {result['bundle']} --state-dir STATE",
                  soft_wrap=True)


@device_app.command("revoke")
def device_revoke(
    device_id: str = typer.Argument(..., help="The enrolled device to shut out."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the ledger)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Shut a device out: the hub records `device.revoked`, removes the device's user from
    the NATS server's users file and reloads the server (its connection is closed and it
    cannot connect again), and refuses any report still arriving from it."""
    result = _call(_config(home, nats_url), key, timeout, "device.revoke",
                   {"device": device_id, "reason": reason})
    if as_json:
        _print_json(result)
    else:
        note = "" if result.get("reloaded") else (
            "; the NATS server is not local: reload it (nats-server --signal reload) to apply")
        out.print(f"revoked {device_id} (ledger seq {result['seq'][0]}){note}")


@app.command()
def devices(
    state: str | None = typer.Option(None, "--state", help="Only devices in this state "
                                     "(enrolled, assigned, applied, failed, reverted, revoked)."),
    limit: int = typer.Option(100, "--limit", min=1, max=500, help="Devices per page."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many devices first."),
    every: bool = typer.Option(False, "--all", help="Every device, page after page."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """The fleet: each device's model and version (as the device reported it), state,
    last seen, and inference counts from its telemetry; a page at a time (--all for
    all), with how many devices are in each state."""
    body: dict[str, Any] = {"limit": limit, "offset": offset}
    if state is not None:
        body["state"] = state

    async def fetch(client: HubClient) -> dict[str, Any]:
        page: dict[str, Any] = await client.call("devices", body)
        rows = list(page["devices"])
        while every and page["next_offset"] is not None:
            page = await client.call("devices", {**body, "offset": page["next_offset"]})
            rows += page["devices"]
        return {**page, "offset": offset, "devices": rows}

    result = _run(_config(home, nats_url), key, timeout, fetch)
    rows = result["devices"]
    if as_json:
        _print_json(result)
        return
    states = ", ".join(f"{n:,} {s}" for s, n in sorted(result["states"].items()))
    shown = (f"{offset + 1:,}-{offset + len(rows):,} of {result['device_count']:,}"
             if rows else f"none of {result['device_count']:,}")
    table = Table("device", "model/version", "state", "last seen", "inferences", "errors",
                  "p95 ms", title=f"devices {shown}" + (f" ({states})" if states else ""))
    for r in rows:
        running = f"{r['model']}/{r['version']}" if r["model"] else "-"
        shown_state = r["state"]
        if shown_state in ("failed", "reverted"):
            shown_state = f"[red]{shown_state}[/red]: {r['last_error'] or ''}"[:80]
        elif shown_state == "assigned":
            shown_state = f"assigned {r['assigned_model']}/{r['assigned_version']}"
        table.add_row(r["device"], running, shown_state, _ago(r["last_seen"]),
                      f"{r['inferences'] or 0:,}", f"{r['errors'] or 0:,}",
                      f"{r['latency_ms_p95'] or 0:.2f}")
    out.print(table)
    if result["next_offset"] is not None and not every:
        out.print(f"more: --offset {result['next_offset']} (or --all)")


@app.command()
def deploy(
    model: str = typer.Option(..., "--model", help="Model name."),
    version: str = typer.Option(..., "--version", help="Model version (must be released)."),
    device: list[str] = typer.Option([], "--device", help="Target device (repeatable)."),
    all_devices: bool = typer.Option(False, "--all", help="Target every enrolled device."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Assign a released model version to devices (operator role): a signed assignment per
    device goes into the KV bucket the agents watch, and each is recorded in the ledger."""
    if bool(device) == all_devices:
        raise _fail("give --device ID (one or more) or --all, not both", EXIT_USAGE)
    body: dict[str, Any] = {"model": model, "version": version}
    body.update({"all": True} if all_devices else {"devices": device})
    result = _call(_config(home, nats_url), key, timeout, "deploy", body)
    if as_json:
        _print_json(result)
    else:
        out.print(f"{result['deployment']}: {model}/{version} assigned to "
                  f"{len(result['devices'])} device(s); watch with `hub devices`")


# They register `hub keys`, `hub device history`; `hub device tag`, `hub rollout`,
# `hub telemetry`.
from hub.cli import keys as cli_keys  # noqa: E402,F401
from hub.cli import rollouts as cli_rollouts  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

