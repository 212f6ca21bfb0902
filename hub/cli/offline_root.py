"""`hub keys root prepare|sign|import|export-offline|keygen`: the offline root key
(docs/SECURITY.md, "Keeping the root key offline"). hub/cli/__init__.py adds the group
under `hub keys`.

hub.keys (the trust root's rules) is imported by these commands when they run: the rest of
the CLI loads no hub module beyond the client side (tests/test_cli.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import typer
from rich.console import Console
from rich.markup import escape

from hub.cli._common import (
    HOME,
    JSON,
    KEY,
    NATS_URL,
    TIMEOUT,
    call,
    err,
    examples,
    hub_config,
    out,
    rfc3339,
    show,
    utc_time,
)
from hub.errors import UsageError
from ledger.durable import atomic_write
from ledger.errors import KeyFileError
from ledger.signing import PublicKey, SigningKey

if TYPE_CHECKING:
    from hub.keys.offline import RootRequest

root_app = typer.Typer(
    help="Keep the root key offline: the hub prepares trust root N+1, the offline machine "
    "signs it (nothing but the file and the key: no hub home, no NATS, no database), the "
    "hub imports it. docs/SECURITY.md, \"Keeping the root key offline\".",
    no_args_is_help=True,
    epilog=examples(
        'hub keys root export-offline --out /media/usb/root --home hub-home',
        'hub keys root prepare --rotate log --out root-3.json --home hub-home',
        'hub keys root sign root-3.json --key /media/usb/root/root-KEYID.key',
        'hub keys root import root-3.json --home hub-home',
    ),
)


def _read_request(path: Path) -> RootRequest:
    from hub.keys.offline import RootRequest

    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    return RootRequest.loads(text)


def _write_request(path: Path, request: RootRequest) -> None:
    try:
        atomic_write(path, request.dumps().encode(), 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc


def _review_doc(request: RootRequest) -> dict[str, Any]:
    """The review of a request as --json prints it (times in RFC 3339)."""
    from hub.keys.offline import review, threshold_status

    previous, new = request.previous_root(), request.next_root()
    changes = review(previous, new)
    status = threshold_status(previous, new, request.signatures, request.signed)
    return {"version": new.version, "previous_version": previous.version,
            "digest": request.digest,
            "previous_digest": blake3.blake3(request.previous).hexdigest(),
            "expires": rfc3339(new.expires), "expires_ts": new.expires,
            "change": request.change or None, "roles": changes["roles"],
            "changed": changes["changed"], "signatures": status}


def _print_review(doc: dict[str, Any], console: Console) -> None:
    console.print(f"trust root {doc['previous_version']} -> {doc['version']}, expires "
                  f"{utc_time(doc['expires_ts'])}")
    console.print(f"  document digest (BLAKE3): {doc['digest']}")
    console.print(f"  builds on root {doc['previous_version']}, digest "
                  f"{doc['previous_digest']}")
    for role in doc["roles"]:
        if role["role"] not in doc["changed"]:
            continue
        console.print(f"  [bold]{role['role']}[/bold]: threshold "
                      f"{role['previous_threshold']} -> {role['threshold']}")
        for keyid in role["added"]:
            name = role["names"].get(keyid)
            console.print(f"    + {keyid}{f' ({escape(name)})' if name else ''}")
        for keyid in role["removed"]:
            name = role["names"].get(keyid)
            console.print(f"    - {keyid}{f' ({escape(name)})' if name else ''}")
    unchanged = [r["role"] for r in doc["roles"] if r["role"] not in doc["changed"]]
    console.print(f"  unchanged: {', '.join(unchanged) or 'none'}")
    for label in ("previous", "new"):
        s = doc["signatures"][label]
        console.print(f"  root keys of root {s['version']}: {len(s['signed_by'])} of "
                      f"{s['threshold']} signed{': ' if s['signed_by'] else ''}"
                      f"{', '.join(s['signed_by'])}")


@root_app.command("prepare", epilog=examples(
    'hub keys root prepare --rotate log --out root-3.json --home hub-home',
    'hub keys root prepare --revoke 1be27cea36ab6045f4b4176ac3c74d59 --out root-4.json',
    'hub keys root prepare --rotate root --pubkey HEX --threshold 2 --out root-5.json',
    'hub keys root prepare --add-witness witness.example/w1 --pubkey "$(cat w1.key.vkey)" '
    '--out root-6.json',
    'hub keys root prepare --remove-witness witness.example/w0 --out root-7.json',
))
def root_prepare(
    out_file: Path = typer.Option(..., "--out", help="Where to write the signing request "
                                  "(JSON: the document to sign, its digest, root N)."),
    rotate: str | None = typer.Option(
        None, "--rotate", metavar="ROLE", help="Add a new key to ROLE (release, director, "
        "log, timestamp: the hub makes and keeps it in HOME/keys; root: give --pubkey)."),
    revoke: str | None = typer.Option(None, "--revoke", metavar="KEYID",
                                      help="Remove this key from its role."),
    add_witness: str | None = typer.Option(
        None, "--add-witness", metavar="NAME", help="Add a witness (its key name, as in "
        "its vkey) with its key given by --pubkey, as `hub witness add` does."),
    remove_witness: str | None = typer.Option(
        None, "--remove-witness", metavar="NAME", help="Remove the witness NAME (see "
        "`hub witness list`), as `hub witness remove` does."),
    threshold: int | None = typer.Option(
        None, "--threshold", min=1, help="New threshold for the role (default: unchanged)."),
    pubkey: str | None = typer.Option(
        None, "--pubkey", help="--rotate root: the new root key's public key (64 hex "
        "digits, from `hub keys root keygen` on the offline machine). --add-witness: the "
        "witness's key (64 hex digits, or the vkey `ledger witness-key` printed)."),
    home: Path = HOME, as_json: bool = JSON,
) -> None:
    """Build trust root N+1 for one change without signing it, on the hub's machine
    (reads HOME, needs no running hub): the same document `hub keys rotate`, `revoke`,
    `hub witness add` or `remove` would make. Carry the file to the offline machine for
    `hub keys root sign`, then bring it back for `hub keys root import`. Nothing changes
    until the import."""
    from hub.keys.keyring import Keyring
    from hub.keys.offline import prepare_request
    from hub.keys.witness_roots import parse_witness_key

    config = hub_config(home, None, server=True)
    keyring = Keyring(config)
    public = None
    witness = None
    if add_witness is not None:
        if pubkey is None:
            raise UsageError("--add-witness needs the witness's key: --pubkey HEX|VKEY")
        witness = (add_witness, parse_witness_key(add_witness, pubkey))
    elif pubkey is not None:
        try:
            raw = bytes.fromhex(pubkey.strip())
        except ValueError as exc:
            raise UsageError("--pubkey must be 64 hex digits") from exc
        if len(raw) != 32:
            raise UsageError("--pubkey must be a 32-byte Ed25519 public key (64 hex digits)")
        public = PublicKey(raw)
    request, new_key = prepare_request(keyring.root, keyring.held, rotate=rotate,
                                       revoke=revoke, add_witness=witness,
                                       remove_witness=remove_witness, origin=config.origin,
                                       threshold=threshold, pubkey=public)
    # The new role key is on disk before any root names it (as `hub keys rotate` does);
    # it signs nothing until the imported root lists it.
    key_file = keyring.save_new_key(request.change["role"], new_key) if new_key else None
    _write_request(out_file, request)
    doc = {"file": str(out_file), **_review_doc(request),
           "key_file": key_file.name if key_file else None}

    def render(d: dict[str, Any]) -> None:
        out.print(f"wrote {out_file}: trust root {d['version']}, unsigned")
        _print_review(d, out)
        if key_file is not None:
            out.print(f"  new {d['change']['role']} key kept by the hub: HOME/keys/"
                      f"{key_file.name}")
        out.print(f"next, on the offline machine: hub keys root sign {out_file} --key "
                  f"ROOT_KEY; then here: hub keys root import {out_file}")

    show(doc, as_json, render)


@root_app.command("sign", epilog=examples(
    'hub keys root sign root-3.json --key /media/usb/root/root-KEYID.key',
    'hub keys root sign root-3.json --key root-b.key --root trust-root.2.bin --yes',
    'hub keys root sign root-3.json --key root-a.key --out root-3.signed.json',
))
def root_sign(
    request_file: Path = typer.Argument(..., help="The request `hub keys root prepare` "
                                        "wrote (or one another root key signed already)."),
    key_file: Path = typer.Option(..., "--key", help="A root key file of root N or N+1."),
    out_file: Path | None = typer.Option(
        None, "--out", help="Write the signed request here (default: update FILE)."),
    pinned: Path | None = typer.Option(
        None, "--root", help="A copy of root N you trust (e.g. the trust-root.N.bin "
        "`export-offline` wrote): refuse a request that builds on another root."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Sign without asking."),
    as_json: bool = JSON,
) -> None:
    """Review trust root N+1 and sign it with one root key, on the offline machine: it
    needs nothing but the file and the key. The review is decoded from the signed bytes
    (roles, keys added and removed, thresholds, version, expiry). Refuses a file that does
    not parse, a root that is not version N+1 or has expired, a signature that no longer
    verifies (the root changed after it was signed) and a key that signed already.
    With several root keys, each signs in turn until both thresholds are met."""
    from hub.keys.offline import sign_request

    request = _read_request(request_file)
    try:
        key = SigningKey.load(key_file)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from exc
    pinned_bytes = None
    if pinned is not None:
        try:
            pinned_bytes = pinned.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {pinned}: {exc.strerror}") from exc
    # Every check first: a refused request is refused before anyone is asked.
    signed = sign_request(request, key, pinned=pinned_bytes)
    before = _review_doc(request)
    console = err if as_json else out
    if not yes:
        _print_review(before, console)
        if not typer.confirm(f"sign trust root {before['version']} with root key "
                             f"{key.keyid}?", err=True):
            raise UsageError("not signed")
    target = out_file or request_file
    _write_request(target, signed)
    doc = {"file": str(target), "keyid": key.keyid, **_review_doc(signed)}

    def render(d: dict[str, Any]) -> None:
        out.print(f"trust root {d['version']} signed with root key {key.keyid}: {target}")
        for label in ("previous", "new"):
            s = d["signatures"][label]
            out.print(f"  root keys of root {s['version']}: {len(s['signed_by'])} of "
                      f"{s['threshold']}")
        if d["signatures"]["complete"]:
            out.print(f"complete; on the hub: hub keys root import {target}")
        else:
            out.print(f"more root keys must sign: hub keys root sign {target} --key "
                      "ANOTHER_ROOT_KEY")

    show(doc, as_json, render)


@root_app.command("import", epilog=examples(
    'hub keys root import root-3.json --home hub-home',
    'hub keys root import root-3.json --home hub-home --json',
))
def root_import(
    request_file: Path = typer.Argument(..., help="The request, signed on the offline "
                                        "machine (`hub keys root sign`)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Hand trust root N+1, signed with the offline root key(s), to the hub (admin role).
    The hub checks it as a device would (version N+1, a threshold of root N's and of root
    N+1's root keys, unexpired), then records it (`keys.rotated` / `keys.revoked`, with
    `offline: true`), stores and publishes it exactly as `hub keys rotate` / `revoke`
    (or `hub witness add` / `remove`: HOME/witnesses too) do; a revoked release or
    director key has what it signed re-signed. A refused root changes nothing."""
    request = _read_request(request_file)
    config = hub_config(home, nats_url)
    result = call(config, key, timeout, "keys.import_root",
                  {"root": request.envelope().encode()})
    result = {**result, "key_file": result.get("key_file") or None}

    def render(r: dict[str, Any]) -> None:
        what = "added to" if "resigned_manifests" not in r else "removed from"
        named = f" (witness {escape(r['name'])})" if r.get("name") else ""
        out.print(f"trust root version {r['version']} imported: key {r['keyid']}{named} "
                  f"{what} the {r['role']} role (threshold {r['threshold']}); devices pick "
                  "it up from the KV bucket `roots`")
        if r.get("resigned_manifests") or r.get("resigned_assignments"):
            out.print(f"re-signed {r['resigned_manifests']} manifest(s) and "
                      f"{r['resigned_assignments']} assignment(s)")

    show(result, as_json, render)


@root_app.command("export-offline", epilog=examples(
    'hub keys root export-offline --out /media/usb/root --home hub-home',
))
def root_export_offline(
    out_dir: Path = typer.Option(..., "--out", help="Directory the root key goes to (not "
                                 "inside HOME): the medium you carry to the offline machine."),
    home: Path = HOME,
) -> None:
    """Move the root key(s) out of HOME/keys into DIR, with a copy of the current root
    (DIR/trust-root.N.bin, for `hub keys root sign --root`). The hub keeps running
    without them; from then on trust root changes go through `hub keys root prepare`,
    `sign` (offline) and `import`. Keep DIR off every networked machine."""
    from hub.keys.keyring import Keyring

    config = hub_config(home, None, server=True)
    keyring = Keyring(config)
    version = keyring.root.version
    moved = keyring.move_root_keys(out_dir)
    pin = out_dir / f"trust-root.{version}.bin"
    for path in moved:
        out.print(f"root key moved out of {config.home / 'keys'}: {path}")
    out.print(f"current trust root (version {version}) copied to {pin}")
    out.print("the hub no longer holds the root key: change the trust root with "
              "`hub keys root prepare`, `hub keys root sign` (offline), `hub keys root import`")


@root_app.command("keygen", epilog=examples(
    'hub keys root keygen --out /media/usb/root/root-b.key',
    'hub keys root keygen --out root-b.key --json',
))
def root_keygen(
    out_file: Path = typer.Option(..., "--out", help="The new root key file (0600)."),
    as_json: bool = JSON,
) -> None:
    """Make a new root key on the offline machine (no hub home needed). Add it to the root
    role with `hub keys root prepare --rotate root --pubkey PUBLIC` on the hub; both the
    old and the new root key then sign that root."""
    if out_file.exists():
        raise UsageError(f"{out_file} exists already; not overwriting a key file")
    new = SigningKey.generate()
    new.save(out_file)
    doc = {"file": str(out_file), "keyid": new.keyid, "public": new.public.raw.hex()}
    show(doc, as_json, lambda d: out.print(
        f"new root key {d['keyid']} in {out_file}\npublic key (for `hub keys root prepare "
        f"--rotate root --pubkey`): {d['public']}"))
