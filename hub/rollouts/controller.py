"""The rollout controller: an asyncio task in the hub that moves running rollouts on.

Each tick it reads a running rollout's waves and device outcomes (projections, i.e. the
ledger) and its telemetry (hub.telemetry.ingest), asks the pure `rules.decide` for the
next step, and appends that step as events with actor `hub`, through the hub's single
writer (hub.commands.writer: the same lock and `append` as operator commands).
Assignments go to KV only after the ledger has them. It keeps no state of its own:
after a restart it continues from what the ledger says.

Cheap at 1,000 devices: a rollout whose inputs have not changed since its last "nothing
to do" (same ledger head, same telemetry count when it has telemetry gates, and before
its next deadline or end of bake) is not re-read at all; a decision reads the wave
membership once, as (wave, device, state, counter) tuples, and the telemetry only when
a gate needs it or an event will carry it; joiners are looked for only after an
enrolment, a tag change or a rollout event. What it remembers is only a cache of
"nothing changed": dropping it changes no decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection

from hub import events as ev
from hub.clock import Clock, Stopwatch, SystemClock
from hub.commands.writer import LedgerWriter
from hub.devices import state as device_state
from hub.devices.assignments import AssignmentIssuer, PutAssignment, write_all
from hub.rollouts import rules as ro
from hub.rollouts import state as rs
from hub.rollouts.commands import rollback_events, rollout_release
from hub.rollouts.state import Member, member_rows, telemetry_view, wave_views
from hub.telemetry.ingest import TelemetryIngest
from ledger.storage import query
from ledger.storage.store import NewEvent

log = logging.getLogger("hub.rollouts")

MAX_STEPS_PER_TICK = 16
QUIET_MAX_S = 60.0  # re-decide an unchanged rollout at least this often
# An assignment write is retried this long through a NATS outage, then left to the
# reconciler (hub/service/reconcile.py), which retries it until it lands.
KV_GIVE_UP_S = 30.0
# Entries after which a device may have joined a rollout's target: an enrolment, a tag
# change, or a rollout event (a rollout that ends frees its devices).
JOIN_KINDS = (ev.DEVICE_ENROLLED, ev.DEVICE_TAGGED)
JOIN_PREFIXES = ("rollout.",)


class RolloutController:
    def __init__(self, writer: LedgerWriter, telemetry: TelemetryIngest,
                 issuer: AssignmentIssuer, put_assignment: PutAssignment,
                 tick: float = 0.2, kv_give_up_s: float = KV_GIVE_UP_S,
                 on_writes_left: Callable[[list[str]], None] | None = None,
                 clock: Clock | None = None) -> None:
        self.writer = writer
        self.telemetry = telemetry
        self.issuer = issuer
        self.put_assignment = put_assignment
        self.tick = tick
        self.kv_give_up_s = kv_give_up_s
        self.on_writes_left = on_writes_left  # devices whose KV write was left undone
        self.writes_left = 0
        # Wave deadlines and bakes: monotonic within this process; after a restart a
        # wall clock that went backwards never stretches them (hub/clock.py).
        self.clock: Clock = clock or SystemClock()
        self.stopwatch = Stopwatch(self.clock)
        self._join_seq: dict[str, int] = {}  # ledger head at the last joiner search
        # rollout -> (ledger head, telemetry windows, monotonic due) of its last "nothing
        # to do": while all three hold, the decision cannot change.
        self._quiet: dict[str, tuple[int, int, float]] = {}
        self.decisions = 0
        self.evaluations = 0  # decisions computed (for benchmarks: skipped ones are not)

    async def run(self) -> None:
        failing = ""  # the error of the last step, while steps fail: logged once
        while True:
            try:
                await self.step()
                if failing:
                    log.info("rollout controller steps work again")
                    failing = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep controlling the other rollouts; say what went wrong
                error = f"{type(exc).__name__}: {exc}"
                if error != failing:
                    log.error("rollout controller step failed: %s", error)
                log.debug("rollout controller step failed", exc_info=exc)
                failing = error
            await asyncio.sleep(self.tick)

    async def step(self) -> None:
        running = self.writer.read(lambda c: rs.list_rollouts(c, (ro.RUNNING,)))
        ids = {r["rollout"] for r in running}
        for rid in set(self._quiet) - ids:
            del self._quiet[rid]
        self.stopwatch.forget(lambda key: isinstance(key, tuple) and key[0] in ids)
        for rollout in running:
            for _ in range(MAX_STEPS_PER_TICK):
                if not await self._advance(rollout["rollout"]):
                    break

    def _inputs(self, conn: Connection) -> tuple[int, int]:
        head = query.head_seq(conn)
        return (-1 if head is None else head), self.telemetry.windows_total

    async def _advance(self, rid: str) -> bool:
        """One decision for one rollout; True if something was appended."""
        async with self.writer.lock:
            with self.writer.store.engine.connect() as conn:
                head, windows = self._inputs(conn)
                quiet = self._quiet.get(rid)
                if quiet is not None and quiet[0] == head and quiet[1] in (-1, windows) \
                        and self._monotonic() < quiet[2]:
                    return False  # nothing its decision depends on has changed
                rollout = rs.get_rollout(conn, rid)
                if rollout is None or rollout["state"] != ro.RUNNING:
                    return False
                self.evaluations += 1
                events, writes, due = self._plan(conn, rollout, head)
                if not events:
                    # Without telemetry gates, new telemetry cannot change the decision.
                    gated = ro.Policy.from_payload(rollout["policy"]).has_gates
                    self._quiet[rid] = (head, windows if gated else -1, due)
            if not events:
                return False
            self._quiet.pop(rid, None)
            await self.writer.append(events, leader=True)  # fenced: leaders decide
        left = await write_all(self.put_assignment, writes, give_up_s=self.kv_give_up_s)
        if left:
            self.writes_left += len(left)
            if self.on_writes_left is not None:
                self.on_writes_left(left)
        self.decisions += 1
        return True

    def _plan(self, conn: Connection, rollout: dict[str, Any], head: int
              ) -> tuple[list[NewEvent], list[tuple[str, bytes]], float]:
        """The events of the next step and their KV writes; with none, also the
        monotonic time by which the clock alone may change the decision."""
        rid = rollout["rollout"]
        policy = ro.Policy.from_payload(rollout["policy"])
        members = member_rows(conn, rid)
        now_ns = self.clock.wall_ns()
        waves = self._on_this_clock(rid, wave_views(conn, rid, members), now_ns)
        # Telemetry decides only through the gates; otherwise it is evidence, read only
        # when an event will carry it (decide() is the same without gates either way).
        decision = ro.decide(policy, waves, ro.TelemetryView(), now_ns)
        if policy.has_gates or decision.action != ro.ACT_NONE:
            telemetry = self._telemetry(conn, rollout, members)
            decision = ro.decide(policy, waves, telemetry, now_ns)
        if decision.action == ro.ACT_NONE:
            events, writes = self._joiners(conn, rollout, waves, members, head)
            return events, writes, self._monotonic() + _due_in(policy, waves, now_ns)
        events, writes = self._events(conn, rollout, policy, decision)
        return events, writes, 0.0

    def _monotonic(self) -> float:
        return self.clock.monotonic_ns() / 1e9

    def _on_this_clock(self, rid: str, waves: list[ro.WaveView], now_ns: int
                       ) -> list[ro.WaveView]:
        """The current wave's start and bake instants (wall clock, from the ledger)
        moved onto this process's timeline: the time elapsed since each runs on the
        monotonic clock from when this process first saw it, and a wall clock that is
        behind the recorded instant counts as "just started" (hub/clock.py). So a bake
        of 5 s ends at most 5 s after this process saw it begin, whatever the wall
        clock does; `rules.decide` stays pure and compares with `now_ns`."""
        out = []
        for w in waves:
            if w.state not in (ro.WAVE_ROLLING, ro.WAVE_BAKING):
                out.append(w)
                continue
            started = self.stopwatch.as_of_now((rid, w.index, "start"), w.started_ns, now_ns)
            baking = (self.stopwatch.as_of_now((rid, w.index, "bake"), w.baking_ns, now_ns)
                      if w.state == ro.WAVE_BAKING else w.baking_ns)
            out.append(replace(w, started_ns=started, baking_ns=baking))
        return out

    def _events(self, conn: Connection, rollout: dict[str, Any], policy: ro.Policy,
                decision: ro.Decision) -> tuple[list[NewEvent], list[tuple[str, bytes]]]:
        rid = rollout["rollout"]
        subject = ev.rollout_subject(rid)
        actor = ev.CONTROLLER_ACTOR
        base = {"rollout": rid, "wave": decision.wave}
        if decision.action == ro.ACT_START_WAVE:
            started = NewEvent(ev.ROLLOUT_WAVE_STARTED, actor, subject,
                               {**base, "devices": list(decision.devices)})
            issued = self.issuer.issue(
                conn, actor, rid, list(decision.devices), rollout_release(rollout),
                extra={"wave": decision.wave})
            log.info("%s: wave %d started (%d devices)", rid, decision.wave,
                     len(decision.devices))
            return [started, *issued.events], issued.writes
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
        events, issued, _ = rollback_events(
            conn, self.issuer, rollout, actor, f"automatic: {decision.reason}", True,
            first=halt)
        return events, issued.writes

    def _telemetry(self, conn: Connection, rollout: dict[str, Any],
                   members: list[Member]) -> ro.TelemetryView:
        return telemetry_view(conn, self.telemetry, rollout, members)

    def _joiners(self, conn: Connection, rollout: dict[str, Any],
                 waves: list[ro.WaveView], members: list[Member], head: int
                 ) -> tuple[list[NewEvent], list[tuple[str, bytes]]]:
        """Devices that joined the target since the rollout was created get its release
        in the current wave. Looked for only when the ledger has an enrolment, a tag
        change or a rollout event since the last search (nothing else adds a device to
        a target or frees one from another rollout)."""
        rid = rollout["rollout"]
        since = self._join_seq.get(rid)
        if since is not None and since == head:
            return [], []
        if since is not None and not query.any_entry(conn, query.EntryFilter(
                kinds=JOIN_KINDS, kind_prefixes=JOIN_PREFIXES, after_seq=since)):
            self._join_seq[rid] = head
            return [], []
        self._join_seq[rid] = head
        current = next((w for w in waves if w.state in (ro.WAVE_ROLLING, ro.WAVE_BAKING)), None)
        if current is None:
            return [], []
        selector = ro.parse_selector(rollout["target"])
        tags = rs.device_tags(conn)
        busy = rs.active_rollout_of(conn)
        in_rollout = {m.device for m in members}
        joined = sorted(
            d["device"] for d in device_state.list_devices(conn)
            if d["device"] not in in_rollout and d["device"] not in busy
            and d["state"] != device_state.REVOKED
            and selector.matches(d["device"], *tags.get(d["device"], ("", {})))
        )
        if not joined:
            return [], []
        actor = ev.CONTROLLER_ACTOR
        events = [NewEvent(ev.ROLLOUT_DEVICE_ADDED, actor, ev.rollout_subject(rid),
                           {"rollout": rid, "wave": current.index, "device": d})
                  for d in joined]
        issued = self.issuer.issue(conn, actor, rid, joined, rollout_release(rollout),
                                   extra={"wave": current.index})
        log.info("%s: %d device(s) joined the target; assigned in wave %d", rid, len(joined),
                 current.index)
        return [*events, *issued.events], issued.writes


def _due_in(policy: ro.Policy, waves: list[ro.WaveView], now_ns: int) -> float:
    """Seconds after which the clock alone may change a "nothing to do" decision: until
    the current wave's deadline or the end of its bake; at the latest a minute (a
    cache, not a rule: re-deciding is always allowed)."""
    times = [now_ns + int(QUIET_MAX_S * 1e9)]
    current = next((w for w in waves if w.state in (ro.WAVE_ROLLING, ro.WAVE_BAKING)), None)
    if current is not None:
        times.append(current.started_ns + int(policy.deadline_s * 1e9))
        if current.state == ro.WAVE_BAKING:
            times.append(current.baking_ns + int(policy.bake_s * 1e9))
    due_ns = min(t for t in times if t > now_ns) if any(t > now_ns for t in times) else now_ns
    return (due_ns - now_ns) / 1e9
