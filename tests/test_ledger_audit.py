"""Auditing with signed checkpoints, offline: the checkpoint table, `ledger verify
--checkpoint / --since-checkpoint`, export files and proof bundles (ledger/storage/audit.py,
checkpoint_store.py, export.py, bundle.py), through the real `ledger` command."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from ledger.bundle import verify_bundle
from ledger.checkpoint import Checkpoint, cosign, sign_checkpoint, tree_hash_extensions
from ledger.errors import BundleError, LedgerError, StoreError
from ledger.export import verify_export
from ledger.note import CosignatureSigner, Signer, parse_note
from ledger.signing import SigningKey
from ledger.storage.bundles import make_bundle
from ledger.storage.checkpoint_store import CheckpointStore
from ledger.storage.export import write_export
from ledger.storage.store import LedgerStore

TS = 1_700_000_000_000_000_000
ORIGIN = "fleetledger.example/hub-1"


def run_ledger(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledger.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def fill(store: LedgerStore, count: int, start: int = 0, tag: str = "ok") -> None:
    for i in range(start, start + count):
        store.append("device.status", f"dev-{i % 3}", f"device:dev-{i % 3}",
                     {"i": i, "v": tag}, ts=TS + i * 1_000_000_000)


@pytest.fixture
def signer() -> Signer:
    return Signer.from_signing_key(ORIGIN, SigningKey.generate())


@pytest.fixture
def log_vkey(tmp_path: Path, signer: Signer) -> str:
    path = tmp_path / "log.vkey"
    path.write_text(signer.vkey() + "\n")
    return str(path)


def checkpoint(store: LedgerStore, signer: Signer, size: int, keep: bool = True) -> bytes:
    root = store.root(size)
    extensions = tree_hash_extensions(store.tree_hash.name)
    note = sign_checkpoint(Checkpoint(ORIGIN, size, root, extensions), signer)
    if keep:
        CheckpointStore(store).add(size, root, note)
    return note


@pytest.fixture
def ledger(tmp_path: Path, signer: Signer) -> Iterator[tuple[Path, LedgerStore]]:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        fill(store, 12)
        checkpoint(store, signer, 5)
        checkpoint(store, signer, 12)
        fill(store, 4, start=12)
        yield path, store


# -- the checkpoint table ------------------------------------------------------------


def test_checkpoint_store_keeps_notes_and_cosignatures(ledger_url: str, signer: Signer) -> None:
    with LedgerStore.open(ledger_url) as store:
        fill(store, 7)
        cps = CheckpointStore(store)
        assert cps.latest() is None
        note = checkpoint(store, signer, 7)
        assert cps.add(7, store.root(7), note) is False  # the same note again: a no-op
        with pytest.raises(StoreError, match="different checkpoint of tree size 7"):
            cps.add(7, store.root(7), note + b"x")
        witness = SigningKey.generate()
        cosigned = cosign(note, witness, "w.example/1", 1_700_000_000)
        sig = parse_note(cosigned)[1][-1]
        assert cps.add_cosignature(7, sig) and not cps.add_cosignature(7, sig)
        latest = cps.latest()
        assert latest is not None and latest.size == 7 and latest.note == note
        assert latest.full_note() == cosigned
        assert [c.size for c in cps.all()] == [7]
        for stmt in ("UPDATE ledger_checkpoints SET ts = 0",
                     "DELETE FROM ledger_checkpoints", "DELETE FROM ledger_cosignatures"):
            with pytest.raises(IntegrityError), store.engine.begin() as conn:
                conn.execute(text(stmt))


# -- verify against checkpoints ------------------------------------------------------


def test_verify_with_checkpoints(ledger: tuple[Path, LedgerStore], log_vkey: str,
                                 tmp_path: Path, signer: Signer) -> None:
    path, store = ledger
    note = tmp_path / "cp16.note"
    note.write_bytes(checkpoint(store, signer, 16, keep=False))
    done = run_ledger("verify", "--db", str(path), "--log-key", log_vkey, "--checkpoint",
                      str(note))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "agrees with 3 signed checkpoint(s), the largest of tree size 16" in done.stdout
    missing_key = run_ledger("verify", "--db", str(path), "--checkpoint", str(note))
    assert missing_key.returncode == 2 and "--log-key" in missing_key.stderr
    stored = tmp_path / "cp5.note"
    kept = run_ledger("checkpoint", "--db", str(path), "--size", "5", "--out", str(stored))
    assert kept.returncode == 0, kept.stderr
    assert stored.read_text().startswith(f"{ORIGIN}\n5\n")
    since = run_ledger("verify", "--db", str(path), "--log-key", log_vkey,
                       "--since-checkpoint", str(stored))
    assert since.returncode == 0 and "OK: 11 new entries" in since.stdout, since.stdout


def test_truncation_below_a_checkpoint_is_detected(
    ledger: tuple[Path, LedgerStore], log_vkey: str, tmp_path: Path, signer: Signer
) -> None:
    _, store = ledger
    note = tmp_path / "cp16.note"
    note.write_bytes(checkpoint(store, signer, 16, keep=False))
    short = tmp_path / "short.db"
    with LedgerStore.open(short) as copy:
        fill(copy, 10)  # the same first 10 entries, the rest cut off
    done = run_ledger("verify", "--db", str(short), "--log-key", log_vkey, "--checkpoint",
                      str(note))
    assert done.returncode == 1
    assert "truncation below a signed checkpoint: the checkpoint covers 16 entries, the " \
           "ledger has 10" in done.stdout
    since = run_ledger("verify", "--db", str(short), "--log-key", log_vkey,
                       "--since-checkpoint", str(note))
    assert since.returncode == 1 and "truncation below a signed checkpoint" in since.stdout


def test_a_fork_disagrees_with_the_checkpoint_and_two_checkpoints_are_evidence(
    ledger: tuple[Path, LedgerStore], log_vkey: str, tmp_path: Path, signer: Signer
) -> None:
    _, store = ledger
    honest = tmp_path / "honest.note"
    honest.write_bytes(checkpoint(store, signer, 16, keep=False))
    forked_db = tmp_path / "fork.db"
    with LedgerStore.open(forked_db) as fork:
        fill(fork, 9)
        fill(fork, 7, start=9, tag="rewritten")  # same size, different history from seq 9
        forked = tmp_path / "forked.note"
        forked.write_bytes(checkpoint(fork, signer, 16, keep=False))
        fork_root = fork.root(16)
    done = run_ledger("verify", "--db", str(forked_db), "--log-key", log_vkey,
                      "--checkpoint", str(honest))
    assert done.returncode == 1
    assert "fork: the ledger disagrees with a signed checkpoint: at tree size 16" in done.stdout
    assert store.root(16).hex() in done.stdout and fork_root.hex() in done.stdout
    both = run_ledger("verify", "--db", str(forked_db), "--log-key", log_vkey,
                      "--checkpoint", str(honest), "--checkpoint", str(forked))
    assert both.returncode == 1
    assert "fork in log fleetledger.example/hub-1 at tree size 16" in both.stdout
    assert honest.read_text() in both.stdout and forked.read_text() in both.stdout
    since = run_ledger("verify", "--db", str(forked_db), "--log-key", log_vkey,
                       "--since-checkpoint", str(tmp_path / "honest.note"))
    assert since.returncode == 1 and "fork" in since.stdout


def test_since_checkpoint_checks_only_new_entries_and_finds_damage_there(
    ledger: tuple[Path, LedgerStore], log_vkey: str, tmp_path: Path, signer: Signer
) -> None:
    path, store = ledger
    note = tmp_path / "cp12.note"
    note.write_bytes(checkpoint(store, signer, 12, keep=False))
    done = run_ledger("verify", "--db", str(path), "--log-key", log_vkey,
                      "--since-checkpoint", str(note), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["checked"] == 4 and doc["entries"] == 16
    assert doc["merkle_root"] == store.root().hex()
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER ledger_entries_no_update")
    (body,) = raw.execute("SELECT body FROM ledger_entries WHERE seq = 14").fetchone()
    raw.execute("UPDATE ledger_entries SET body = ? WHERE seq = 14",
                (body.replace(b"ok", b"no"),))
    raw.commit()
    raw.close()
    bad = run_ledger("verify", "--db", str(path), "--log-key", log_vkey,
                     "--since-checkpoint", str(note))
    assert bad.returncode == 1
    assert bad.stdout.startswith("FAIL at seq 14: entry edited"), bad.stdout


# -- export files --------------------------------------------------------------------


def test_an_export_verifies_offline_and_a_changed_byte_names_the_seq(
    ledger: tuple[Path, LedgerStore], log_vkey: str, tmp_path: Path
) -> None:
    path, store = ledger
    out = tmp_path / "ledger.export"
    done = run_ledger("export", "--db", str(path), str(out))
    assert done.returncode == 0, done.stderr
    assert "16 entries, 2 checkpoint(s)" in done.stdout
    ok = run_ledger("verify", str(out), "--log-key", log_vkey)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: 16 entries" in ok.stdout and "2 checkpoint(s) agree" in ok.stdout
    data = bytearray(out.read_bytes())
    body = store.get(9)
    assert body is not None
    at = bytes(data).index(body.body) + len(body.body) - 3  # inside entry 9's payload
    data[at] ^= 0x01
    out.write_bytes(bytes(data))
    bad = run_ledger("verify", str(out), "--log-key", log_vkey)
    assert bad.returncode == 1
    assert bad.stdout.startswith("FAIL at seq 9:"), bad.stdout


def test_every_single_byte_change_in_an_export_is_caught(
    tmp_path: Path, signer: Signer
) -> None:
    with LedgerStore.open(tmp_path / "small.db") as store:
        fill(store, 4)
        checkpoint(store, signer, 2)
        checkpoint(store, signer, 4)
        out = tmp_path / "small.export"
        write_export(store, out)
    data = out.read_bytes()
    assert verify_export(out, signer.verifier()).ok
    changed = tmp_path / "changed.export"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x20
        changed.write_bytes(bytes(flipped))
        try:
            result = verify_export(changed, signer.verifier())
        except LedgerError:  # the file is not an export any more: caught too
            continue
        assert not result.ok, f"a change at byte {i} went unnoticed"


# -- proof bundles -------------------------------------------------------------------


@pytest.fixture
def witnesses() -> list[tuple[str, SigningKey]]:
    return [("w.example/one", SigningKey.generate()), ("w.example/two", SigningKey.generate())]


def cosigned_bundle(tmp_path: Path, signer: Signer, witnesses: list[tuple[str, SigningKey]],
                    ) -> tuple[bytes, list[str]]:
    with LedgerStore.open(tmp_path / "b.db") as store:
        fill(store, 9)
        note = checkpoint(store, signer, 9)
        name, key = witnesses[0]
        sig = parse_note(cosign(note, key, name, 1_700_000_000))[1][-1]
        CheckpointStore(store).add_cosignature(9, sig)
        data = make_bundle(store, 5)
        with pytest.raises(BundleError, match="not covered by the latest checkpoint"):
            fill(store, 1, start=9)
            make_bundle(store, 9)
    vkeys = [CosignatureSigner.from_signing_key(n, k).vkey() for n, k in witnesses]
    return data, vkeys


def test_a_bundle_verifies_offline(tmp_path: Path, signer: Signer, log_vkey: str,
                                   witnesses: list[tuple[str, SigningKey]]) -> None:
    data, vkeys = cosigned_bundle(tmp_path, signer, witnesses)
    bundle = tmp_path / "seq5.bundle"
    bundle.write_bytes(data)
    ok = run_ledger("verify-bundle", str(bundle), "--log-key", log_vkey, "--witness-key",
                    vkeys[0])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "entry seq 5" in ok.stdout and "w.example/one" in ok.stdout
    too_few = run_ledger("verify-bundle", str(bundle), "--log-key", log_vkey,
                         "--witness-key", vkeys[0], "--witness-key", vkeys[1])
    assert too_few.returncode == 1 and "2 required" in too_few.stdout
    enough = run_ledger("verify-bundle", str(bundle), "--log-key", log_vkey, "--witness-key",
                        vkeys[0], "--witness-key", vkeys[1], "--min-witnesses", "1")
    assert enough.returncode == 0, enough.stdout
    other_log = Signer.from_signing_key(ORIGIN, SigningKey.generate()).vkey()
    wrong = run_ledger("verify-bundle", str(bundle), "--log-key", other_log)
    assert wrong.returncode == 1 and "FAIL: checkpoint" in wrong.stdout


def test_every_single_byte_change_in_a_bundle_fails(
    tmp_path: Path, signer: Signer, witnesses: list[tuple[str, SigningKey]]
) -> None:
    data, _ = cosigned_bundle(tmp_path, signer, witnesses)
    name, key = witnesses[0]
    witness = CosignatureSigner.from_signing_key(name, key).verifier()
    report = verify_bundle(data, signer.verifier(), [witness])
    assert report.entry.seq == 5 and report.witnesses == [name]
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        with pytest.raises(BundleError):
            verify_bundle(bytes(flipped), signer.verifier(), [witness])


# -- audit holes (issue 12, class 8) -------------------------------------------------


def test_an_export_is_checked_against_given_checkpoints(
    ledger: tuple[Path, LedgerStore], log_vkey: str, tmp_path: Path, signer: Signer
) -> None:
    path, store = ledger
    out = tmp_path / "ledger.export"
    assert run_ledger("export", "--db", str(path), str(out)).returncode == 0
    honest = tmp_path / "honest.note"
    honest.write_bytes(checkpoint(store, signer, 16, keep=False))
    with LedgerStore.open(tmp_path / "fork.db") as fork:
        fill(fork, 9)
        fill(fork, 9, start=9, tag="rewritten")
        forked, longer = tmp_path / "forked.note", tmp_path / "longer.note"
        forked.write_bytes(checkpoint(fork, signer, 16, keep=False))
        longer.write_bytes(checkpoint(fork, signer, 18, keep=False))
    ok = run_ledger("verify", str(out), "--log-key", log_vkey, "--checkpoint", str(honest))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "agrees with 1 given signed checkpoint(s)" in ok.stdout
    for option, note, problem in [
        ("--checkpoint", forked, "fork: the ledger disagrees with a signed checkpoint at "
                                 "tree size 16"),
        ("--since-checkpoint", forked, "fork: the ledger disagrees"),
        ("--checkpoint", longer, "truncation below a signed checkpoint: it covers 18"),
    ]:
        bad = run_ledger("verify", str(out), "--log-key", log_vkey, option, str(note))
        assert bad.returncode == 1 and problem in bad.stdout, (option, bad.stdout)
    since = run_ledger("verify", str(out), "--log-key", log_vkey, "--since-checkpoint",
                       str(honest))
    assert since.returncode == 0 and "an export is read whole" in since.stdout
    no_key = run_ledger("verify", str(out), "--checkpoint", str(honest))
    assert no_key.returncode == 2 and "--log-key" in no_key.stderr


def test_with_a_log_key_a_ledger_without_any_checkpoint_fails(
    tmp_path: Path, log_vkey: str
) -> None:
    path = tmp_path / "bare.db"
    with LedgerStore.open(path) as store:
        fill(store, 5)
        write_export(store, tmp_path / "bare.export")
    for target in (["--db", str(path)], [str(tmp_path / "bare.export")]):
        bad = run_ledger("verify", *target, "--log-key", log_vkey)
        assert bad.returncode == 1, bad.stdout
        assert "no checkpoint signed by the given log key covers this ledger" in bad.stdout
        allowed = run_ledger("verify", *target, "--log-key", log_vkey, "--allow-no-checkpoint")
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        assert "WARNING: no signed checkpoint" in allowed.stdout
        assert run_ledger("verify", *target).returncode == 0  # no key: the chain only


def test_witness_keys_require_and_report_cosignatures(
    ledger: tuple[Path, LedgerStore], log_vkey: str, tmp_path: Path,
    witnesses: list[tuple[str, SigningKey]],
) -> None:
    path, store = ledger
    name, key = witnesses[0]
    stored = CheckpointStore(store).get(12)
    assert stored is not None
    sig = parse_note(cosign(stored.full_note(), key, name, 1_700_000_000))[1][-1]
    CheckpointStore(store).add_cosignature(12, sig)
    real, made_up = (CosignatureSigner.from_signing_key(n, k).vkey() for n, k in witnesses)
    out = tmp_path / "ledger.export"
    write_export(store, out)
    for target in (["--db", str(path)], [str(out)]):
        ok = run_ledger("verify", *target, "--log-key", log_vkey, "--witness-key", real)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "witnessed: the checkpoint of tree size 12 is cosigned by w.example/one" \
            in ok.stdout
        fake = run_ledger("verify", *target, "--log-key", log_vkey, "--witness-key", made_up)
        assert fake.returncode == 1, fake.stdout
        assert "no checkpoint is cosigned by 1 of the 1 given witness(es)" in fake.stdout
        both = run_ledger("verify", *target, "--log-key", log_vkey, "--witness-key", real,
                          "--witness-key", made_up)
        assert both.returncode == 1 and "cosignatures found by: w.example/one" in both.stdout
        one = run_ledger("verify", *target, "--log-key", log_vkey, "--witness-key", real,
                         "--witness-key", made_up, "--min-witnesses", "1", "--json")
        assert one.returncode == 0, one.stdout
        assert json.loads(one.stdout)["witnessed"] == {
            "size": 12, "witnesses": ["w.example/one"], "required": 1}
    no_log = run_ledger("verify", "--db", str(path), "--witness-key", real)
    assert no_log.returncode == 2 and "--witness-key needs --log-key" in no_log.stderr


def test_the_tree_hash_is_bound_by_the_signed_checkpoint(
    tmp_path: Path, signer: Signer, log_vkey: str
) -> None:
    path = tmp_path / "b3.db"
    with LedgerStore.open(path, tree_hash="blake3") as store:
        fill(store, 6)
        note = checkpoint(store, signer, 6)
        assert note.decode().startswith(f"{ORIGIN}\n6\n")
        assert "\nfleetledger-merkle-hash blake3\n" in note.decode()
        bound = make_bundle(store, 2)
        write_export(store, tmp_path / "b3.export")
    assert verify_bundle(bound, signer.verifier()).merkle_hash == "blake3"
    # A bundle or export that claims another tree hash than the checkpoint signs.
    claims_sha = bound.replace(b"\xa6blake3", b"\xa6sha256", 1)
    with pytest.raises(BundleError, match="tree hash mismatch: sha256 is claimed"):
        verify_bundle(claims_sha, signer.verifier())
    data = (tmp_path / "b3.export").read_bytes()
    claimed = data.replace(b"merkle_hash\xa6blake3", b"merkle_hash\xa6sha256", 1)
    (tmp_path / "sha.export").write_bytes(claimed)
    done = run_ledger("verify", str(tmp_path / "sha.export"), "--log-key", log_vkey)
    assert done.returncode == 1 and "tree hash mismatch: sha256 is claimed" in done.stdout
    # A checkpoint without the line signs an RFC 6962 (SHA-256) tree: a BLAKE3 bundle on
    # it is refused; `ledger verify` still accepts such legacy checkpoints of a BLAKE3
    # ledger, whose roots it recomputes from the entries.
    with LedgerStore.open(tmp_path / "legacy.db", tree_hash="blake3") as store:
        fill(store, 6)
        root = store.root(6)
        CheckpointStore(store).add(6, root, sign_checkpoint(Checkpoint(ORIGIN, 6, root),
                                                            signer))
        legacy = make_bundle(store, 2)
    with pytest.raises(BundleError, match=r"no tree-hash line: RFC 6962"):
        verify_bundle(legacy, signer.verifier())
    old = run_ledger("verify", "--db", str(tmp_path / "legacy.db"), "--log-key", log_vkey,
                     "--json")
    assert old.returncode == 0, old.stdout
    assert json.loads(old.stdout)["checkpoints"][0]["tree_hash_signed"] is False


# -- browsing ------------------------------------------------------------------------


def test_query_by_kind_subject_actor_and_time(ledger: tuple[Path, LedgerStore]) -> None:
    path, _ = ledger
    done = run_ledger("query", "--db", str(path), "--subject", "device:dev-1", "--actor",
                      "dev-1", "--since", "2023-11-14T22:13:23Z", "--until",
                      str(TS + 11 * 1_000_000_000), "--json")
    assert done.returncode == 0, done.stderr
    assert [e["seq"] for e in json.loads(done.stdout)] == [4, 7, 10]
    table = run_ledger("query", "--db", str(path), "--kind", "device.status", "--newest",
                       "--limit", "2")
    assert table.returncode == 0 and "matching entries" in table.stdout
    assert " 14 " in table.stdout and " 15 " in table.stdout and " 13 " not in table.stdout
    none = run_ledger("query", "--db", str(path), "--kind", "model.released", "--json")
    assert json.loads(none.stdout) == []
    bad = run_ledger("query", "--db", str(path), "--since", "yesterday")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


# A device install (`pip install fleetledger`, no `hub` extra) has no SQLAlchemy; this
# meta-path finder stands in for that install in a fresh interpreter.
WITHOUT_HUB_EXTRA = """
import sys
class NoHubExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("sqlalchemy", "sqlmodel", "psycopg"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoHubExtra())
sys.argv = ["ledger", *sys.argv[1:]]
from ledger.cli import main
main()
"""


def test_a_device_install_verifies_bundles_and_names_the_extra_for_a_database(
        tmp_path: Path, signer: Signer, log_vkey: str,
        witnesses: list[tuple[str, SigningKey]]) -> None:
    """The offline checks an auditor or a device runs on files need no storage code; a
    command that opens a database says which extra to install (exit 2, one line)."""
    data, vkeys = cosigned_bundle(tmp_path, signer, witnesses)
    bundle = tmp_path / "seq5.bundle"
    bundle.write_bytes(data)

    def ledger(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", WITHOUT_HUB_EXTRA, *args],
                              capture_output=True, text=True, timeout=60, check=False)

    ok = ledger("verify-bundle", str(bundle), "--log-key", log_vkey, "--witness-key", vkeys[0])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    db = ledger("verify", "--db", str(tmp_path / "b.db"))
    assert db.returncode == 2, db.stdout + db.stderr
    assert "pip install 'fleetledger[hub]'" in db.stderr
    assert "Traceback" not in db.stderr
