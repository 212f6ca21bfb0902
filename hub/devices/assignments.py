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
    ttl_s: float  # an assignment's lifetime (renewed before it ends: hub/service/reconcile.py)
    wall_ns: Callable[[], int] = time.time_ns

    @property
    def ttl_ns(self) -> int:
        return int(self.ttl_s * 1e9)

    def sign(self, assignment: proto.Assignment, signers: list[SigningKey]) -> bytes:
        return proto.SignedEnvelope.sign(
            assignment.to_map(), proto.DOMAIN_ASSIGNMENT, signers).encode()

    def issue(self, conn: Connection, actor: str, rollout: str, devices: list[str],
              release: dict[str, Any], extra: dict[str, Any] | None = None,
              previous: bool = True, in_rollout: bool = True) -> Issued:
        """Assignments of `release` for `devices` (enrolled ones), each with the device's
        next counter. `rollout` names the deployment or rollout; `in_rollout` records it
        as the event's `rollout` too, `previous` the release the device ran before."""
        now = self.wall_ns()
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
                expires=now + self.ttl_ns,
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
                manifest_hashes: dict[tuple[str, str], str], reason: str,
                only: set[str] | None = None) -> Issued:
        """Each device's current assignment again (of the devices in `only`, if given),
        with its next counter and a new expiry, signed by `signers` (a key revocation,
        or a renewal before expiry); `manifest_hashes` are re-signed manifests' hashes."""
        now = self.wall_ns()
        out = Issued()
        devices = {d["device"]: d for d in device_state.list_devices(conn)}
        for device, last in sorted(current_assignments(conn, only).items()):
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
                issued_at=now, expires=now + self.ttl_ns,
            ), signers)
            out.add(actor, device, envelope, {
                **{k: v for k, v in last.items() if k != "command"},
                "counter": counter, "manifest_hash": manifest_hash,
                "assignment": envelope, "resigned": True, "reason": reason})
        return out


def current_assignments(conn: Connection, only: set[str] | None = None
                        ) -> dict[str, dict[str, Any]]:
    """The payload of each device's newest `device.assigned` event (of `only`'s)."""
    out: dict[str, dict[str, Any]] = {}
    if only is not None:
        for device in only:
            entry = query.last_entry(conn, query.EntryFilter(
                kinds=(ev.DEVICE_ASSIGNED,), subject=ev.device_subject(device)))
            if entry is not None:
                out[device] = dict(entry.payload)
        return out
    for entry in query.iter_entries(conn, query.EntryFilter(kinds=(ev.DEVICE_ASSIGNED,))):
        out[entry.payload["device"]] = dict(entry.payload)
    return out


async def write_all(put: PutAssignment, writes: Iterable[tuple[str, bytes]],
                    give_up_s: float | None = None) -> list[str]:
    """Put assignments in KV, KV_WRITES_IN_FLIGHT at a time. Without `give_up_s` every
    write is tried once and the first failure is raised after them all. With it, each
    write is retried through a NATS outage for up to that long, then left: the devices
    whose writes were left are returned (and logged once). Nothing is lost either way:
    the hub's reconciler (hub/service/reconcile.py) puts the ledger's assignment into KV
    wherever KV lacks it, retrying until it lands."""
    slots = asyncio.Semaphore(KV_WRITES_IN_FLIGHT)

    async def one(device: str, envelope: bytes) -> bool:
        async with slots:
            if give_up_s is None:
                await put(device, envelope)
                return True
            return await _until_done(put, device, envelope, give_up_s)

    pairs = list(writes)
    outcomes = await asyncio.gather(*(one(d, e) for d, e in pairs), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    left = [device for (device, _), done in zip(pairs, outcomes, strict=True) if not done]
    if left:
        log.warning("left %d assignment write(s) to the reconciler after %.0f s of "
                    "failures: %s", len(left), give_up_s or 0, ", ".join(left[:10]))
    return left


async def _until_done(put: PutAssignment, device: str, envelope: bytes,
                      give_up_s: float) -> bool:
    delay = 0.2
    deadline = time.monotonic() + give_up_s
    failures = 0
    while True:
        try:
            await put(device, envelope)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            if time.monotonic() > deadline:
                return False
            if failures == 1:
                log.info("assignment write for %s failed (%s); retrying", device, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
