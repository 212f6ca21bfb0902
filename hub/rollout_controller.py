"""The rollout controller: an asyncio task in the hub that moves running rollouts on.

Each tick it reads a running rollout's waves and device outcomes (projections, i.e. the
ledger) and its telemetry (hub.telemetry_ingest), asks the pure `rollouts.decide` for
the next step, and appends that step as events with actor `hub`, through the hub's
single-writer path (the same lock and `_append` as operator commands). Assignments go
to KV only after the ledger has them. It keeps no state of its own: after a restart it
continues from what the ledger says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from ledger.store import NewEvent

from . import events as ev
from . import projections as proj
from . import rollout_state as rs
from . import rollouts as ro
from .rollout_commands import AssignmentIssuer, rollback_events, rollout_release

if TYPE_CHECKING:
    from .service import HubService

log = logging.getLogger("hub.rollouts")

MAX_STEPS_PER_TICK = 16
JOIN_CHECK_S = 1.0

Effects = list[Callable[[], Awaitable[None]]]


class RolloutController:
    def __init__(self, hub: HubService, issuer: AssignmentIssuer, tick: float = 0.2) -> None:
        self.hub = hub
        self.issuer = issuer
        self.tick = tick
        self._last_join_check: dict[str, float] = {}
        self.decisions = 0

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep controlling the other rollouts; say what went wrong
                log.exception("rollout controller step failed")
            await asyncio.sleep(self.tick)

    async def step(self) -> None:
        running = self.hub._read(lambda c: rs.list_rollouts(c, (ro.RUNNING,)))
        for rollout in running:
            for _ in range(MAX_STEPS_PER_TICK):
                if not await self._advance(rollout["rollout"]):
                    break

    async def _advance(self, rid: str) -> bool:
        """One decision for one rollout; True if something was appended."""
        hub = self.hub
        async with hub._write_lock:
            with hub.store.engine.connect() as conn:
                rollout = rs.get_rollout(conn, rid)
                if rollout is None or rollout["state"] != ro.RUNNING:
                    return False
                events, effects = self._plan(conn, rollout)
            if not events:
                return False
            await hub._append(events)
        for effect in effects:
            await _until_done(effect)
        self.decisions += 1
        return True

    def _plan(self, conn: Connection, rollout: dict[str, Any]) -> tuple[list[NewEvent], Effects]:
        rid = rollout["rollout"]
        policy = ro.Policy.from_payload(rollout["policy"])
        waves = wave_views(conn, rid)
        telemetry = self.telemetry_view(conn, rollout)
        decision = ro.decide(policy, waves, telemetry, time.time_ns())
        subject = ev.rollout_subject(rid)
        actor = ev.CONTROLLER_ACTOR
        base = {"rollout": rid, "wave": decision.wave}
        if decision.action == ro.ACT_NONE:
            return self._joiners(conn, rollout, waves)
        if decision.action == ro.ACT_START_WAVE:
            started = NewEvent(ev.ROLLOUT_WAVE_STARTED, actor, subject,
                               {**base, "devices": list(decision.devices)})
            more, effects = self.issuer.issue(
                conn, actor, rid, list(decision.devices), rollout_release(rollout),
                self.hub._put_assignment, extra={"wave": decision.wave})
            log.info("%s: wave %d started (%d devices)", rid, decision.wave,
                     len(decision.devices))
            return [started, *more], effects
        if decision.action == ro.ACT_TIME_OUT:
            return [NewEvent(ev.ROLLOUT_DEVICES_TIMED_OUT, actor, subject, {
                **base, "devices": list(decision.devices), "deadline_s": policy.deadline_s,
                "evidence": decision.evidence})], []
        if decision.action == ro.ACT_BAKE:
            return [NewEvent(ev.ROLLOUT_WAVE_BAKING, actor, subject, {
                **base, "bake_s": policy.bake_s, "evidence": decision.evidence})], []
        if decision.action == ro.ACT_COMPLETE_WAVE:
            log.info("%s: wave %d completed: %s", rid, decision.wave, decision.evidence)
            return [NewEvent(ev.ROLLOUT_WAVE_COMPLETED, actor, subject, {
                **base, "evidence": decision.evidence})], []
        if decision.action == ro.ACT_COMPLETE:
            log.info("%s: completed", rid)
            return [NewEvent(ev.ROLLOUT_COMPLETED, actor, subject, {
                "rollout": rid, "evidence": decision.evidence})], []
        assert decision.action == ro.ACT_HALT, decision
        log.warning("%s: halted in wave %d: %s", rid, decision.wave, decision.reason)
        halt = NewEvent(ev.ROLLOUT_HALTED, actor, subject, {
            **base, "reason": decision.reason, "evidence": decision.evidence,
            "auto_rollback": policy.auto_rollback})
        if not policy.auto_rollback:
            return [halt], []
        events, effects, _ = rollback_events(
            conn, self.issuer, rollout, actor, f"automatic: {decision.reason}", True,
            self.hub._put_assignment, first=halt)
        return events, effects

    def telemetry_view(self, conn: Connection, rollout: dict[str, Any]) -> ro.TelemetryView:
        release = proj.get_release(conn, rollout["model"], rollout["version"])
        reference = (release or {}).get("validation", {}).get("reference_histograms", [])
        keys = [(r["device"], rollout["digest"], r["counter"])
                for r in rs.list_rollout_devices(conn, rollout["rollout"]) if r["counter"]]
        return self.hub.telemetry.view(keys, reference)

    def _joiners(self, conn: Connection, rollout: dict[str, Any],
                 waves: list[ro.WaveView]) -> tuple[list[NewEvent], Effects]:
        """Devices that joined the target since the rollout was created get its release
        in the current wave."""
        rid = rollout["rollout"]
        now = time.monotonic()
        if now - self._last_join_check.get(rid, 0.0) < JOIN_CHECK_S:
            return [], []
        self._last_join_check[rid] = now
        current = next((w for w in waves if w.state in (ro.WAVE_ROLLING, ro.WAVE_BAKING)), None)
        if current is None:
            return [], []
        selector = ro.parse_selector(rollout["target"])
        tags = rs.device_tags(conn)
        busy = rs.active_rollout_of(conn)
        members = {r["device"] for r in rs.list_rollout_devices(conn, rid)}
        joined = sorted(
            d["device"] for d in proj.list_devices(conn)
            if d["device"] not in members and d["device"] not in busy
            and selector.matches(d["device"], *tags.get(d["device"], ("", {})))
        )
        if not joined:
            return [], []
        actor = ev.CONTROLLER_ACTOR
        events = [NewEvent(ev.ROLLOUT_DEVICE_ADDED, actor, ev.rollout_subject(rid),
                           {"rollout": rid, "wave": current.index, "device": d})
                  for d in joined]
        more, effects = self.issuer.issue(conn, actor, rid, joined, rollout_release(rollout),
                                          self.hub._put_assignment,
                                          extra={"wave": current.index})
        log.info("%s: %d device(s) joined the target; assigned in wave %d", rid, len(joined),
                 current.index)
        return [*events, *more], effects


async def _until_done(effect: Callable[[], Awaitable[None]], give_up_s: float = 120.0) -> None:
    """Run a KV write the ledger already records; retry through a NATS outage (the
    device acts only on what is in KV, so a lost write would strand it)."""
    delay = 0.2
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            await effect()
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


def wave_views(conn: Connection, rid: str) -> list[ro.WaveView]:
    devices: dict[int, dict[str, str]] = {}
    for row in rs.list_rollout_devices(conn, rid):
        devices.setdefault(row["wave"], {})[row["device"]] = row["state"]
    return [ro.WaveView(w["wave"], w["state"], devices.get(w["wave"], {}), w["started_ts"],
                        w["baking_ts"])
            for w in rs.list_waves(conn, rid)]
