#!/usr/bin/env python3
"""`ledger report` on a large ledger: the time to write the HTML audit report, next to
`ledger verify` of the same database in the same run (the report verifies too, so the
ratio says what gathering and rendering add). Timings printed, never asserted.

    .venv/bin/python scripts/bench_report.py [--entries 1000000] [--devices 10000]

The ledger is a fleet's: two operators, five model versions (registered, validated,
approved, released), rollouts with waves and decisions, --devices devices enrolled, and
the rest device lifecycle reports (assigned, applied) round-robin over the devices;
a checkpoint signed by a log key at the end, so the report checks it. The report is for
one device's history (--device), as an auditor asks it. Both commands run as the real
CLIs (`python -m ledger.cli`), in their own processes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.protocol import StatusReport, encode_signed_report  # noqa: E402
from hub.commands.envelope import sign_command  # noqa: E402
from ledger.checkpoint import Checkpoint, sign_checkpoint  # noqa: E402
from ledger.note import Signer  # noqa: E402
from ledger.signing import SigningKey  # noqa: E402
from ledger.storage.checkpoint_store import CheckpointStore  # noqa: E402
from ledger.storage.store import LedgerStore, NewEvent  # noqa: E402

BATCH = 2000
ORIGIN = "bench.example/report"


class Signers:
    """Real signatures, as the hub records them: operator commands signed by the
    operators' keys, each device's `applied` report by its own key."""

    def __init__(self, devices: list[str]) -> None:
        self.ops = {name: SigningKey.generate() for name in ("admin", "approver")}
        self.devices = {d: SigningKey.generate() for d in devices}

    def command(self, who: str, verb: str, body: dict[str, Any]) -> tuple[str, bytes]:
        key = self.ops[who]
        return key.keyid, sign_command(key, verb, body, audience=ORIGIN)

    def applied(self, device: str, version: str, counter: int) -> bytes:
        return encode_signed_report(StatusReport(
            device=device, boot="b1", seq=counter, ts=time.time_ns(), event="applied",
            model="kws", version=version, digest=f"{int(version):064x}", counter=counter,
            reason=""), self.devices[device])


def fleet_events(entries: int, devices: int) -> list[list[NewEvent]]:
    """The ledger's events in batches of BATCH."""
    ids = [f"dev-{i:05d}" for i in range(devices)]
    sig = Signers(ids)
    head: list[NewEvent] = []
    for name, key in sig.ops.items():
        head.append(NewEvent("operator.added", "root", f"operator:{name}", {
            "name": name, "keyid": key.keyid, "roles": ["admin"],
            "public": key.public.raw}))
    for v in range(1, 6):
        ref = {"name": "kws", "version": str(v)}
        steps: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
                 ("admin", "model.registered", "model.register", {
                      "digest": f"{v:064x}", "size": 1 << 20, "lineage": {"parent": v - 1},
                      "card": {"owner": "ml-team"}}),
                 ("admin", "model.validated", "model.validate", {
                      "passed": True, "metrics": {"accuracy": 0.91 + v / 1000},
                      "policy": {"min_accuracy": 0.9}, "failures": []}),
                 ("approver", "model.approved", "model.approve", {}),
                 ("admin", "model.released", "model.release", {
                      "manifest_hash": f"{v:064x}", "expires": 0}))
        for who, kind, verb, extra in steps:
            actor, command = sig.command(who, verb, ref)
            head.append(NewEvent(kind, actor, f"model:kws/{v}",
                                 {**ref, **extra, "command": command}))
    head += [NewEvent("device.enrolled", sig.ops["admin"].keyid, f"device:{d}", {
        "device": d, "public": sig.devices[d].public.raw}) for d in ids]
    body: list[NewEvent] = []
    rollout = 0
    while len(head) + len(body) < entries:
        rollout += 1
        rid, version = f"r-{rollout}", str(1 + rollout % 5)
        ref = {"rollout": rid, "model": "kws", "version": version}
        actor, command = sig.command("admin", "rollout.create", ref)
        body.append(NewEvent("rollout.created", actor, f"rollout:{rid}", {
            **ref, "target": "all", "wave_sizes": [devices // 10, devices - devices // 10],
            "policy": {"max_error_rate": 0.05}, "command": command}))
        for wave, share in ((0, ids[: devices // 10]), (1, ids[devices // 10:])):
            body.append(NewEvent("rollout.wave_started", "hub", f"rollout:{rid}",
                                 {**ref, "wave": wave}))
            fields = {"model": "kws", "version": version, "digest": f"{int(version):064x}",
                      "counter": rollout, "rollout": rid}
            body += [NewEvent("device.assigned", "hub", f"device:{d}", {"device": d, **fields})
                     for d in share]
            body += [NewEvent("device.update_applied", d, f"device:{d}", {
                "device": d, **fields, "report": sig.applied(d, version, rollout)})
                for d in share]
            body.append(NewEvent("rollout.wave_completed", "hub", f"rollout:{rid}", {
                **ref, "wave": wave, "evidence": {"error_rate": 0.0, "psi": 0.01}}))
        body.append(NewEvent("rollout.completed", "hub", f"rollout:{rid}", ref))
    events = (head + body)[:entries]
    return [events[i:i + BATCH] for i in range(0, len(events), BATCH)]


def build(path: Path, entries: int, devices: int) -> tuple[float, Path]:
    t = time.perf_counter()
    store = LedgerStore.open(path)
    try:
        for batch in fleet_events(entries, devices):
            store.append_many(batch)
        key = SigningKey.generate()
        signer = Signer.from_signing_key(ORIGIN, key)
        size = store.count()
        root = store.root(size)
        CheckpointStore(store).add(size, root, sign_checkpoint(
            Checkpoint(ORIGIN, size, root), signer))
        vkey = path.parent / "log.vkey"
        vkey.write_text(signer.vkey() + "\n")
    finally:
        store.close()
    return time.perf_counter() - t, vkey


def timed(*argv: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ledger.cli", *argv], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - t, done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--keep", action="store_true", help="keep the ledger and the report")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    db = tmp / "ledger.db"
    try:
        built, vkey = build(db, args.entries, args.devices)
        verify_s, verify = timed("verify", "--db", str(db), "--log-key", str(vkey))
        out = tmp / "report.html"
        report_s, report = timed("report", "--db", str(db), "--log-key", str(vkey),
                                 "--device", "dev-00042", "--out", str(out))
        results: dict[str, Any] = {
            "built": built, "verify": verify_s, "report": report_s,
            "html_mib": out.stat().st_size / 2**20 if out.exists() else 0.0,
        }
        print(f"ledger: {args.entries:,} entries, {args.devices:,} devices "
              f"(built in {built:.0f} s, {db.stat().st_size / 2**20:.0f} MiB SQLite)")
        print("| command | exit | seconds | ratio to verify |")
        print("|---|---|---|---|")
        print(f"| `ledger verify --log-key` (baseline) | {verify.returncode} | {verify_s:.1f} "
              "| 1.00x |")
        print(f"| `ledger report --log-key --device` | {report.returncode} | {report_s:.1f} | "
              f"{report_s / verify_s:.2f}x |")
        print(f"report: {results['html_mib']:.2f} MiB of HTML; {report.stdout.strip()}")
        bad = [d for d in (verify, report) if d.returncode != 0]
        for done in bad:
            print(done.stdout[-500:], done.stderr[-1500:])
        return 1 if bad else 0
    finally:
        if args.keep:
            print(f"kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
