"""The one place a signed assignment is made, and the one KV fan-out that delivers them.

An assignment tells one device which release to run; the director key signs it, the
ledger records it (`device.assigned`, the signed envelope in `assignment`), and only
after the commit is it put in the KV bucket `assignments` under the device id, where the
device watches. Deploy, rollouts (waves, joiners, rollbacks) and key revocation
(re-signing) all issue through `AssignmentIssuer` and deliver through `write_all`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from edge_agent import protocol as proto
from hub import events as ev
from hub.commands.outcome import DAY_NS
from hub.devices import state as device_state
from hub.governance import state as governance
from ledger.signing import SigningKey
from ledger.storage import query
from ledger.storage.store import NewEvent

log = logging.getLogger("hub.assignments")

# KV writes awaiting their acks at once: one key per device, so they are independent,
# and one after the other a large deploy or wave waited a NATS round trip per device.
KV_WRITES_IN_FLIGHT = 64
PutAssignment = Callable[[str, bytes], Awaitable[None]]


@dataclass
class Issued:
    """`device.assigned` events and the (device, signed envelope) KV writes after them."""

    events: list[NewEvent] = field(default_factory=list)
    writes: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, actor: str, device: str, envelope: bytes, payload: dict[str, Any]) -> None:
        self.events.append(NewEvent(ev.DEVICE_ASSIGNED, actor, ev.device_subject(device),
                                    payload))
        self.writes.append((device, envelope))


@dataclass(frozen=True)
class AssignmentIssuer:
    """Signs per-device assignments with the director key(s) in force."""

    signers: Callable[[], list[SigningKey]]  # the director key(s) in force now
    ttl_days: int

    def sign(self, assignment: proto.Assignment, signers: list[SigningKey]) -> bytes:
        return proto.SignedEnvelope.sign(
            assignment.to_map(), proto.DOMAIN_ASSIGNMENT, signers).encode()

    def issue(self, conn: Connection, actor: str, rollout: str, devices: list[str],
              release: dict[str, Any], extra: dict[str, Any] | None = None,
              previous: bool = True, in_rollout: bool = True) -> Issued:
        """Assignments of `release` for `devices` (enrolled ones), each with the device's
        next counter. `rollout` names the deployment or rollout; `in_rollout` records it
        as the event's `rollout` too, `previous` the release the device ran before."""
        now = time.time_ns()
        out = Issued()
        rows = device_state.get_devices(conn, list(devices))  # one query for a whole wave
        signers = self.signers() if devices else []
        for device in devices:
            row = rows.get(device)
            if row is None or row["state"] == device_state.REVOKED:
                continue  # a revoked device is never assigned anything
            counter = int(row["counter"]) + 1
            envelope = self.sign(proto.Assignment(
                device=device, model=release["name"], version=release["version"],
                digest=release["digest"], manifest_hash=release["manifest_hash"],
                counter=counter, rollout=rollout, issued_at=now,
                expires=now + self.ttl_days * DAY_NS,
            ), signers)
            payload: dict[str, Any] = {
                "device": device, "deployment": rollout,
                "model": release["name"], "version": release["version"],
                "digest": release["digest"], "counter": counter,
                "manifest_hash": release["manifest_hash"], "assignment": envelope,
                **(extra or {}),
            }
            if in_rollout:
                payload["rollout"] = rollout
            if previous:
                payload["previous_model"] = row["model"] or ""
                payload["previous_version"] = row["version"] or ""
            out.add(actor, device, envelope, payload)
        return out

    def reissue(self, conn: Connection, actor: str, signers: list[SigningKey],
                manifest_hashes: dict[tuple[str, str], str], reason: str) -> Issued:
        """Each device's current assignment again, with its next counter, signed by
        `signers` (a key revocation); `manifest_hashes` are re-signed manifests' hashes."""
        now = time.time_ns()
        out = Issued()
        devices = {d["device"]: d for d in device_state.list_devices(conn)}
        for device, last in sorted(current_assignments(conn).items()):
            row = devices.get(device)
            if (row is None or row["state"] == device_state.REVOKED
                    or row["counter"] != last.get("counter")
                    or not isinstance(last.get("assignment"), bytes)):
                continue
            release = governance.get_release(conn, last["model"], last["version"])
            if release is None or not release["manifest_hash"]:
                continue
            manifest_hash = manifest_hashes.get((last["model"], last["version"]),
                                                release["manifest_hash"])
            old = proto.Assignment.from_map(
                proto.SignedEnvelope.decode(last["assignment"]).document("assignment"))
            counter = row["counter"] + 1
            envelope = self.sign(proto.Assignment(
                device=device, model=old.model, version=old.version, digest=old.digest,
                manifest_hash=manifest_hash, counter=counter, rollout=old.rollout,
                issued_at=now, expires=now + self.ttl_days * DAY_NS,
            ), signers)
            out.add(actor, device, envelope, {
                **{k: v for k, v in last.items() if k != "command"},
                "counter": counter, "manifest_hash": manifest_hash,
                "assignment": envelope, "resigned": True, "reason": reason})
        return out


def current_assignments(conn: Connection) -> dict[str, dict[str, Any]]:
    """The payload of each device's newest `device.assigned` event."""
    out: dict[str, dict[str, Any]] = {}
    for entry in query.iter_entries(conn, query.EntryFilter(kinds=(ev.DEVICE_ASSIGNED,))):
        out[entry.payload["device"]] = dict(entry.payload)
    return out


async def write_all(put: PutAssignment, writes: Iterable[tuple[str, bytes]],
                    give_up_s: float | None = None) -> None:
    """Put assignments in KV, KV_WRITES_IN_FLIGHT at a time. Without `give_up_s` every
    write is tried once and the first failure is raised after them all (the hub re-puts
    what the ledger says at its next start: hub.devices.assignment_sync). With it, each
    write is retried through a NATS outage for up to that long (the device acts only on
    what is in KV, so a lost write would strand it), then logged and given up."""
    slots = asyncio.Semaphore(KV_WRITES_IN_FLIGHT)

    async def one(device: str, envelope: bytes) -> None:
        async with slots:
            if give_up_s is None:
                await put(device, envelope)
            else:
                await _until_done(put, device, envelope, give_up_s)

    outcomes = await asyncio.gather(*(one(d, e) for d, e in writes), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def _until_done(put: PutAssignment, device: str, envelope: bytes,
                      give_up_s: float) -> None:
    delay = 0.2
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            await put(device, envelope)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() > deadline:
                log.error("giving up on an assignment write after %.0f s: %s", give_up_s, exc)
                return
            log.warning("assignment write failed (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
