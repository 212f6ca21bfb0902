"""Telemetry ingest: de-duplicated aggregation of device windows, per device and model
assignment (device, digest, counter), which maps to a rollout wave.

Windows arrive on the REPORTS stream. JetStream drops a re-published message id within
its duplicate window; here, a window whose (boot, seq) this device already sent is not
counted again (a redelivery after a hub restart, or a spool resend after the window).
Per boot the hub keeps the highest seq counted and the seqs it skipped below it (up to
MAX_HOLES): a window can arrive after a later one (a fetch lost in a NATS restart is
redelivered only after the ack wait, while newer windows flow), and it must still count.
Status reports share the seq counter, so some holes are never filled; the bound keeps
them from piling up.
`offer` counts in memory; `flush` writes everything offered since the last flush in one
transaction, and the report consumer acknowledges the messages only after that, so a
window is counted exactly once across hub and NATS restarts.

Telemetry is not a lifecycle fact: these tables are not rebuilt from the ledger. What
the rollout controller concludes from them is, with the numbers, in the ledger.

With several hub processes (hub.commands.leadership) every process counts: they share
the REPORTS durable consumer, and a window goes to whichever fetched it. So the
database, not a process's memory, holds the counts: `flush` locks the rows of its
batch's devices (in device order), decides the per-boot dedupe again on the committed
row, and writes the committed totals plus its windows. Two processes that got the same
window (one died or stalled past the ack wait after fetching it) count it once; no
leader fence is needed, any live process may count. Reads load the committed counts
again once another process has counted (checked at most every `refresh_s`), so every
process shows the same numbers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, case, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, SQLModel

from edge_agent import protocol as proto
from edge_agent.protocol.bins import LATENCY_BUCKETS_MS, quantile_from_buckets
from hub.columns import int64_columns
from hub.devices import state as device_state
from hub.rollouts import rules as ro
from hub.telemetry.drift import psi_per_output
from hub.wire import DEVICE_SORTS

MAX_BOOTS_REMEMBERED = 16
MAX_HOLES = 128  # seqs skipped below the highest, remembered per boot


class TelemetryAggRow(SQLModel, table=True):
    __tablename__ = "telemetry_agg"
    device: str = Field(primary_key=True)
    digest: str = Field(primary_key=True)
    counter: int = Field(primary_key=True)
    model: str = ""
    version: str = ""
    windows: int = 0
    inferences: int = 0
    errors: int = 0
    latency_buckets: str = "[]"  # JSON counts
    output_hist: str = "[]"  # JSON list of count lists
    first_ts: int = 0
    last_ts: int = 0


class TelemetryDeviceRow(SQLModel, table=True):
    __tablename__ = "telemetry_devices"
    device: str = Field(primary_key=True)
    seen: str = "{}"  # JSON {boot: highest seq counted, or [highest, [skipped seqs]]}
    windows: int = 0
    duplicates: int = 0
    dropped: int = 0  # the device spool's own count of dropped reports


AGG = SQLModel.metadata.tables[TelemetryAggRow.__tablename__]
DEVS = SQLModel.metadata.tables[TelemetryDeviceRow.__tablename__]
int64_columns(AGG, DEVS)
_AGG_VALUES = ("model", "version", "windows", "inferences", "errors", "latency_buckets",
               "output_hist", "first_ts", "last_ts")
_DEV_VALUES = ("seen", "windows", "duplicates", "dropped")


@dataclass
class _Agg:
    model: str
    version: str
    windows: int = 0
    inferences: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    first_ts: int = 0
    last_ts: int = 0
    stored: bool = False


@dataclass
class _Dev:
    seen: dict[str, int] = field(default_factory=dict)
    holes: dict[str, list[int]] = field(default_factory=dict)  # boot -> skipped seqs
    windows: int = 0
    duplicates: int = 0
    dropped: int = 0
    stored: bool = False
    inferences: int = 0  # totals over this device's aggregates (memory only)
    errors: int = 0


def _first_time(dev: _Dev, boot: str, seq: int) -> bool:
    """Whether (boot, seq) was not counted before; records it (see the module docstring)."""
    high = dev.seen.get(boot, -1)
    if seq > high:
        holes = dev.holes.setdefault(boot, [])
        holes.extend(range(max(high + 1, seq - MAX_HOLES, 0), seq))
        del holes[: max(0, len(holes) - MAX_HOLES)]  # the oldest go first
        if not holes:
            del dev.holes[boot]
        dev.seen[boot] = seq
        return True
    skipped = dev.holes.get(boot)
    if skipped and seq in skipped:
        skipped.remove(seq)
        return True
    return False


def _load_seen(text: str) -> tuple[dict[str, int], dict[str, list[int]]]:
    seen: dict[str, int] = {}
    holes: dict[str, list[int]] = {}
    for boot, value in json.loads(text).items():
        if isinstance(value, list):  # [highest, [skipped seqs]]
            seen[boot], holes[boot] = int(value[0]), [int(v) for v in value[1]]
        else:  # older rows: the highest only
            seen[boot] = int(value)
    return seen, holes


def _dump_seen(dev: _Dev) -> str:
    return json.dumps({boot: [high, dev.holes[boot]] if dev.holes.get(boot) else high
                       for boot, high in dev.seen.items()})


def _add(into: list[int], more: Iterable[int]) -> list[int]:
    more = list(more)
    if len(into) < len(more):
        into.extend([0] * (len(more) - len(into)))
    for i, v in enumerate(more):
        into[i] += int(v)
    return into


def _agg_of(r: Any) -> _Agg:
    return _Agg(r["model"], r["version"], r["windows"], r["inferences"], r["errors"],
                json.loads(r["latency_buckets"]), json.loads(r["output_hist"]), r["first_ts"],
                r["last_ts"], stored=True)


def _dev_of(r: Any) -> _Dev:
    return _Dev(*_load_seen(r["seen"]), r["windows"], r["duplicates"], r["dropped"],
                stored=True)


def _sums(conn: Connection) -> tuple[int, int, int]:
    """(devices, windows, duplicates) as committed: they only grow, so a change of any
    tells a reader that some process counted."""
    row = conn.execute(select(func.count(), func.coalesce(func.sum(DEVS.c.windows), 0),
                              func.coalesce(func.sum(DEVS.c.duplicates), 0))).one()
    return int(row[0]), int(row[1]), int(row[2])


def _past_int64(a: _Agg | None, dev: _Dev | None, w: proto.TelemetryWindow) -> bool:
    """Whether counting `w` would carry a sum of its assignment or device past 2**63-1."""
    sums = [w.count + (a.inferences if a else 0), w.errors + (a.errors if a else 0),
            w.count + (dev.inferences if dev else 0), (a.windows + 1) if a else 1]
    if a is not None:
        sums += [x + y for x, y in zip(a.latency, w.latency_buckets, strict=False)]
        for mine, theirs in zip(a.outputs, w.output_hist, strict=False):
            sums += [x + y for x, y in zip(mine, theirs, strict=False)]
    return max(sums) > proto.MAX_INT64


def _count_into(dev: _Dev, aggs: dict[tuple[str, str, int], _Agg],
                w: proto.TelemetryWindow) -> bool:
    """Add `w` to its device and assignment aggregate unless the device's dedupe says it
    was counted (then count a duplicate); True if counted."""
    if not _first_time(dev, w.boot, w.seq):
        dev.duplicates += 1
        return False
    if len(dev.seen) > MAX_BOOTS_REMEMBERED:  # oldest boots first (insertion order)
        for boot in list(dev.seen)[: len(dev.seen) - MAX_BOOTS_REMEMBERED]:
            del dev.seen[boot]
            dev.holes.pop(boot, None)
    dev.windows += 1
    dev.dropped = max(dev.dropped, w.dropped)
    agg = aggs.setdefault((w.device, w.digest, w.counter),
                          _Agg(w.model, w.version, first_ts=w.start))
    agg.windows += 1
    agg.inferences += w.count
    agg.errors += w.errors
    dev.inferences += w.count
    dev.errors += w.errors
    _add(agg.latency, w.latency_buckets)
    for k, hist in enumerate(w.output_hist):
        if len(agg.outputs) <= k:
            agg.outputs.append([])
        _add(agg.outputs[k], hist)
    agg.last_ts = max(agg.last_ts, w.end)
    return True


@dataclass
class FlushResult:
    """What one flush stored: windows counted, windows found counted already (by this
    process, or by another one that raced on the same redelivered window), and windows
    refused inside the transaction (their sums would pass 2**63-1 only together with
    what another process counted meanwhile)."""

    counted: int = 0
    duplicates: int = 0
    refused: list[proto.TelemetryWindow] = field(default_factory=list)


def insert_missing(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert the rows whose key is not there yet (two processes may insert the same new
    device at once: the second one waits for the first and inserts nothing)."""
    if not rows:
        return
    stmt: Any
    if conn.dialect.name == "postgresql":
        stmt = postgresql.insert(table).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(table).on_conflict_do_nothing()
    conn.execute(stmt, rows)


class TelemetryIngest:
    """Telemetry counts of every hub process on one database.

    Intake: `check` and `offer` judge a window against what this process knows (the
    committed counts it loaded, plus what it offered since); `flush` then commits the
    offered windows in one transaction, holding the `telemetry_devices` row of each
    device (in device order, so two processes never deadlock): the per-boot dedupe is
    decided again there, on the committed row, and the totals are the committed ones
    plus this batch's windows. So any number of processes may count at once, each
    window is counted once even when two processes race on it (a redelivery after an
    ack wait), and nothing needs the leader's fence.

    Reads (`view`, `device_rows`, `windows_total`, ...) answer from the committed counts:
    at most `refresh_s` after another process committed, a read sees it (one cheap sums
    query tells whether anything changed)."""

    def __init__(self, engine: Engine, refresh_s: float = 1.0) -> None:
        self.engine = engine
        self.refresh_s = refresh_s
        self._lock = threading.RLock()
        self.counted_here = 0  # windows this process counted (committed) since it started
        self.raced_here = 0  # windows it found counted already in the flush's transaction
        with engine.begin() as conn:
            for table in (AGG, DEVS, device_state.TELEMETRY):
                table.create(conn, checkfirst=True)
        self.last_lag_s = 0.0
        self.last_ingest_ns = 0
        # The batch a flush is writing (taken from `_pending` under the lock; written
        # without it), and what its transaction found.
        self._flushing: list[proto.TelemetryWindow] = []
        self._flushing_dups: dict[str, int] = {}
        self._unknown: list[str] = []  # its devices that may have no row yet
        self._latest: dict[str, proto.TelemetryWindow] = {}
        self._added: dict[str, tuple[int, int]] = {}  # device -> (inferences, errors)
        # Devices of the batch being flushed that may have no device_telemetry row yet.
        self._fresh_counters: set[str] = set()
        self._load()

    def _load(self) -> None:
        """The counts as committed (at start, when another process committed more, and
        after a flush that failed: what was offered since the last flush is forgotten,
        and counted again when JetStream redelivers the reports, which were not
        acknowledged)."""
        with self._lock:
            aggs: dict[tuple[str, str, int], _Agg] = {}
            with self.engine.connect() as conn:  # read fully before anything is replaced
                for r in conn.execute(select(AGG)).mappings():
                    aggs[(r["device"], r["digest"], r["counter"])] = _agg_of(r)
                devs: dict[str, _Dev] = {
                    r["device"]: _dev_of(r) for r in conn.execute(select(DEVS)).mappings()}
            rows = len(devs)  # as the sums query counts them
            for (device, _, _), a in aggs.items():
                dev = devs.setdefault(device, _Dev())
                dev.inferences += a.inferences
                dev.errors += a.errors
            self._aggs = aggs
            self._devs = devs
            self._pending: list[proto.TelemetryWindow] = []  # offered, not yet flushed
            self._pending_dups: dict[str, int] = {}  # device -> duplicates offered
            self._windows = sum(d.windows for d in devs.values())
            self._duplicates = sum(d.duplicates for d in devs.values())
            self._db_sums = self._latest_sums = (rows, self._windows, self._duplicates)
            self._checked_at = time.monotonic()

    def _committed_sums(self) -> tuple[int, int, int]:
        """(devices, windows, duplicates) as committed now, asked at most every
        `refresh_s` (else the last answer)."""
        now = time.monotonic()
        if now - self._checked_at >= self.refresh_s:
            self._checked_at = now
            with self.engine.connect() as conn:
                self._latest_sums = _sums(conn)
        return self._latest_sums

    def _fresh(self) -> None:
        """Before a read of the counts: load them again if another process (or this
        one) committed since they were loaded; not while windows are offered and not
        flushed (a batch being stored)."""
        with self._lock:
            if self._pending or self._pending_dups:
                return
            if self._committed_sums() != self._db_sums:
                self._load()

    @property
    def windows_total(self) -> int:
        """Windows counted (by every process), plus those this one offered unflushed.
        One sums query at most every `refresh_s`, no reload (the rollout controller
        asks each tick to see whether telemetry moved)."""
        with self._lock:
            if self._pending or self._pending_dups:
                return self._windows
            return self._committed_sums()[1]

    @property
    def duplicates_total(self) -> int:
        with self._lock:
            if self._pending or self._pending_dups:
                return self._duplicates
            return self._committed_sums()[2]

    # ------------------------------------------------------------ intake

    def check(self, w: proto.TelemetryWindow,
              output_shape: list[int] | None = None) -> None:
        """Refuse (ProtocolError) a window the aggregates cannot take: one whose counts
        would carry a sum past 2**63-1, or whose output histograms do not have the
        shape of the release's drift bins (`output_shape`, bins per output, when the
        hub knows the release) or, else, of the windows counted before for the same
        assignment. Changes nothing. (`flush` checks the sums again on the committed
        row: another process may have counted meanwhile.)"""
        a = self._aggs.get((w.device, w.digest, w.counter))
        dev = self._devs.get(w.device)
        shape = [len(h) for h in w.output_hist]
        if output_shape is not None:
            if shape and shape != output_shape[: len(shape)]:
                raise proto.ProtocolError(
                    f"telemetry: output histograms of shape {shape}, the release's drift "
                    f"bins are {output_shape}", reason="bounds")
        elif a is not None and a.outputs and shape and \
                shape != [len(h) for h in a.outputs][: len(shape)]:
            raise proto.ProtocolError(
                f"telemetry: output histograms of shape {shape}, earlier windows of this "
                f"assignment had {[len(h) for h in a.outputs]}", reason="bounds")
        if _past_int64(a, dev, w):
            raise proto.ProtocolError(
                "telemetry: the window's counts would carry the device's totals past "
                "2**63-1", reason="bounds")

    def offer(self, w: proto.TelemetryWindow) -> bool:
        """Count a window unless this process knows it counted (False); `flush` stores
        it, and decides again on the committed counts. The caller has `check`ed it."""
        with self._lock:
            dev = self._devs.setdefault(w.device, _Dev())
            if not _count_into(dev, self._aggs, w):
                self._pending_dups[w.device] = self._pending_dups.get(w.device, 0) + 1
                self._duplicates += 1
                return False
            self._windows += 1
            self._pending.append(w)
            now = time.time_ns()
            self.last_ingest_ns = now
            self.last_lag_s = max(0.0, (now - w.end) / 1e9)
            return True

    def flush(self) -> FlushResult:
        """Store what was offered since the last flush, in one transaction. If it
        fails, the counts go back to what was committed (so nothing is marked seen that
        is not in the database) and the error is raised: the caller must not
        acknowledge the reports offered since the last flush."""
        with self._lock:
            if not (self._pending or self._pending_dups):
                return FlushResult()
            # The batch leaves `_pending` now: the transaction runs without the lock (it
            # may wait for another process's row locks; reads go on meanwhile).
            self._flushing, self._flushing_dups = self._pending, self._pending_dups
            self._pending, self._pending_dups = [], {}
            devices = {w.device for w in self._flushing} | set(self._flushing_dups)
            # Rows are never deleted: a device this process saw committed has its row.
            self._unknown = sorted(d for d in devices
                                   if d not in self._devs or not self._devs[d].stored)
        try:
            return self._write()
        except BaseException:
            self._load()
            raise

    def reload(self) -> None:
        """Read the counts as committed, dropping what was offered and not flushed."""
        self._load()

    def rollback(self) -> None:
        """Forget what was offered since the last flush (its reports are redelivered)."""
        with self._lock:
            if self._pending or self._pending_dups:
                self._load()

    def _write(self) -> FlushResult:
        pending, dups, unknown = self._flushing, self._flushing_dups, self._unknown
        devices = sorted({w.device for w in pending} | set(dups))
        result = FlushResult()
        with self.engine.begin() as conn:
            insert_missing(conn, DEVS, [{"device": d, "seen": "{}", "windows": 0,
                                          "duplicates": 0, "dropped": 0} for d in unknown])
            # The rows of this batch's devices, locked in device order: every writer of
            # a device's counts (DEVS and its AGG rows) holds its DEVS row first.
            devs = {r["device"]: _dev_of(r) for r in conn.execute(
                select(DEVS).where(DEVS.c.device.in_(devices)).order_by(DEVS.c.device)
                .with_for_update()).mappings()}
            aggs = {(r["device"], r["digest"], r["counter"]): _agg_of(r)
                    for r in conn.execute(select(AGG).where(AGG.c.device.in_(devices)))
                    .mappings()}
            stored = set(aggs)
            # A device with a window counted before has its device_telemetry row (the
            # same transaction wrote both).
            self._fresh_counters = {d for d, dev in devs.items() if dev.windows == 0}
            for device, n in dups.items():
                devs[device].duplicates += n
            for dev in devs.values():  # the device totals, for the overflow check
                dev.inferences = dev.errors = 0
            for (device, _, _), a in aggs.items():
                devs[device].inferences += a.inferences
                devs[device].errors += a.errors
            latest: dict[str, proto.TelemetryWindow] = {}
            added: dict[str, tuple[int, int]] = {}  # device -> (inferences, errors)
            for w in pending:
                dev = devs[w.device]
                if _past_int64(aggs.get((w.device, w.digest, w.counter)), dev, w):
                    result.refused.append(w)
                    continue
                if not _count_into(dev, aggs, w):
                    result.duplicates += 1  # another process counted it meanwhile
                    continue
                result.counted += 1
                n, e = added.get(w.device, (0, 0))
                added[w.device] = (n + w.count, e + w.errors)
                if w.device not in latest or w.end >= latest[w.device].end:
                    latest[w.device] = w
            conn.execute(update(DEVS).where(DEVS.c.device == bindparam("k_device")).values(
                {c: bindparam(c) for c in _DEV_VALUES}),
                [{"k_device": d, "seen": _dump_seen(dev), "windows": dev.windows,
                  "duplicates": dev.duplicates, "dropped": dev.dropped}
                 for d, dev in sorted(devs.items())])
            touched = sorted({(w.device, w.digest, w.counter) for w in pending} & set(aggs))
            inserts = [{"device": k[0], "digest": k[1], "counter": k[2],
                        **self._agg_values(aggs[k])} for k in touched if k not in stored]
            updates = [{"k_device": k[0], "k_digest": k[1], "k_counter": k[2],
                        **self._agg_values(aggs[k])} for k in touched if k in stored]
            if inserts:
                conn.execute(insert(AGG), inserts)
            if updates:
                conn.execute(update(AGG).where(
                    AGG.c.device == bindparam("k_device"), AGG.c.digest == bindparam("k_digest"),
                    AGG.c.counter == bindparam("k_counter")).values(
                        {c: bindparam(c) for c in _AGG_VALUES}), updates)
            self._latest, self._added = latest, added
            self._write_device_counters(conn)
            sums = _sums(conn)
        # Committed: this process now knows these devices' counts as the database has
        # them (including what other processes counted for them).
        with self._lock:
            for device, dev in devs.items():
                self._devs[device] = dev
            for key in [k for k in self._aggs if k[0] in devs]:
                if key not in aggs:
                    del self._aggs[key]  # only an offer that was not counted made it
            self._aggs.update({k: a for k, a in aggs.items()})
            for a in aggs.values():
                a.stored = True
            self._flushing, self._flushing_dups, self._latest = [], {}, {}
            self.counted_here += result.counted
            self.raced_here += result.duplicates
            self._db_sums = self._latest_sums = sums
            if not (self._pending or self._pending_dups):
                self._windows, self._duplicates = sums[1], sums[2]
        return result

    @staticmethod
    def _agg_values(a: _Agg) -> dict[str, Any]:
        return {"model": a.model, "version": a.version, "windows": a.windows,
                "inferences": a.inferences, "errors": a.errors,
                "latency_buckets": json.dumps(a.latency), "output_hist": json.dumps(a.outputs),
                "first_ts": a.first_ts, "last_ts": a.last_ts}

    def _write_device_counters(self, conn: Connection) -> None:
        """The per-device totals `hub devices` shows (table device_telemetry): added to
        what is there (another process may count the same device), the newest window's
        fields where it is newer. Report intake's last-seen times (status reports) write
        the same rows; both take them in device order."""
        if not self._latest:
            return
        table = device_state.TELEMETRY
        devices = sorted(self._latest)
        insert_missing(conn, table, [{"device": d, "last_seen": 0} for d in devices
                                     if d in self._fresh_counters])
        newer = table.c.last_seen <= bindparam("end")
        conn.execute(update(table).where(table.c.device == bindparam("k_device")).values(
            inferences=table.c.inferences + bindparam("d_inferences"),
            errors=table.c.errors + bindparam("d_errors"),
            last_seen=case((newer, bindparam("end")), else_=table.c.last_seen),
            boot=case((newer, bindparam("w_boot")), else_=table.c.boot),
            window_seq=case((newer, bindparam("w_seq")), else_=table.c.window_seq),
            latency_ms_p95=case((newer, bindparam("p95")), else_=table.c.latency_ms_p95)),
            [{"k_device": d, "d_inferences": self._added.get(d, (0, 0))[0],
              "d_errors": self._added.get(d, (0, 0))[1], "end": self._latest[d].end,
              "w_boot": self._latest[d].boot, "w_seq": self._latest[d].seq,
              "p95": float(self._latest[d].latency_ms_p95)} for d in devices])

    # ------------------------------------------------------------ views

    def view(self, assignments: Iterable[tuple[str, str, int]],
             reference: list[dict[str, Any]] | None) -> ro.TelemetryView:
        """Telemetry summed over (device, digest, counter) assignments, with PSI against
        the release's reference histograms (validation payload)."""
        self._fresh()
        inferences = errors = 0
        latency: list[int] = []
        outputs: list[list[int]] = []
        for key in assignments:
            a = self._aggs.get(key)
            if a is None:
                continue
            inferences += a.inferences
            errors += a.errors
            _add(latency, a.latency)
            for k, hist in enumerate(a.outputs):
                if len(outputs) <= k:
                    outputs.append([])
                _add(outputs[k], hist)
        p95 = quantile_from_buckets(latency, 0.95) if latency else None
        per_output = psi_per_output(reference or [], outputs)
        observed = sum(outputs[0]) if outputs else 0
        return ro.TelemetryView(inferences, errors, p95,
                                max(per_output) if per_output else None, tuple(per_output),
                                observed)

    def release_histograms(self, model: str, version: str, digest: str,
                           keys: set[tuple[str, str, int]] | None = None, since_ns: int = 0,
                           ) -> tuple[list[list[int]], int, int, int, int, int]:
        """The output histograms devices reported for one release (its digest), summed
        over every assignment of it, or only `keys`, and only assignments whose first
        window started at or after `since_ns`: (outputs, inferences, devices,
        assignments, first_ts, last_ts). For re-basing the drift reference."""
        self._fresh()
        outputs: list[list[int]] = []
        inferences = assignments = 0
        devices: set[str] = set()
        first_ts = last_ts = 0
        for key, a in sorted(self._aggs.items()):
            if (a.model, a.version, key[1]) != (model, version, digest):
                continue
            if (keys is not None and key not in keys) or a.first_ts < since_ns:
                continue
            assignments += 1
            devices.add(key[0])
            inferences += a.inferences
            first_ts = a.first_ts if not first_ts else min(first_ts, a.first_ts)
            last_ts = max(last_ts, a.last_ts)
            for k, hist in enumerate(a.outputs):
                if len(outputs) <= k:
                    outputs.append([])
                _add(outputs[k], hist)
        return outputs, inferences, len(devices), assignments, first_ts, last_ts

    def totals_by_model(self) -> dict[tuple[str, str], tuple[int, int]]:
        self._fresh()
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for a in self._aggs.values():
            n, e = out.get((a.model, a.version), (0, 0))
            out[(a.model, a.version)] = (n + a.inferences, e + a.errors)
        return out

    def latency_by_model(self) -> dict[tuple[str, str], list[int]]:
        self._fresh()
        out: dict[tuple[str, str], list[int]] = {}
        for a in self._aggs.values():
            _add(out.setdefault((a.model, a.version), []), a.latency)
        return out

    def device_rows(self, device: str | None = None) -> list[dict[str, Any]]:
        self._fresh()
        rows = []
        for (d, digest, counter), a in sorted(self._aggs.items()):
            if device is not None and d != device:
                continue
            dev = self._devs.get(d, _Dev())
            rows.append({
                "device": d, "model": a.model, "version": a.version, "digest": digest,
                "counter": counter, "windows": a.windows, "inferences": a.inferences,
                "errors": a.errors, "p95_ms": quantile_from_buckets(a.latency, 0.95),
                "output_hist": a.outputs, "last_ts": a.last_ts, "dropped": dev.dropped,
                "duplicates": dev.duplicates,
            })
        return rows

    def device_summaries(self, sort: str = "error-rate", limit: int = 20, offset: int = 0
                         ) -> tuple[int, list[dict[str, Any]]]:
        """(devices with telemetry, one page of per-device summaries): a fleet's rows do
        not fit one NATS reply (256 KiB by default) at 1,000 devices, so the fleet view
        is paged, worst first by default. Each row is the device's totals plus the model
        it reported last; `device_rows(device)` has the per-model detail."""
        self._fresh()
        if sort not in DEVICE_SORTS:
            raise ValueError(f"unknown sort {sort!r}; use one of {', '.join(DEVICE_SORTS)}")
        latest: dict[str, tuple[tuple[str, str, int], _Agg]] = {}
        for key, a in self._aggs.items():
            seen = latest.get(key[0])
            if seen is None or (a.last_ts, key[2]) > (seen[1].last_ts, seen[0][2]):
                latest[key[0]] = (key, a)
        rows = []
        for device, ((_, digest, counter), a) in latest.items():
            dev = self._devs.get(device, _Dev())
            rows.append({
                "device": device, "model": a.model, "version": a.version, "digest": digest,
                "counter": counter, "windows": dev.windows, "inferences": dev.inferences,
                "errors": dev.errors,
                "error_rate": dev.errors / dev.inferences if dev.inferences else 0.0,
                "p95_ms": quantile_from_buckets(a.latency, 0.95), "last_ts": a.last_ts,
                "dropped": dev.dropped, "duplicates": dev.duplicates,
            })
        # Ties are broken by device id, so pages are stable while nothing changes.
        order: dict[str, Any] = {
            "error-rate": lambda r: (-r["error_rate"], -r["errors"], r["device"]),
            "errors": lambda r: (-r["errors"], r["device"]),
            "inferences": lambda r: (-r["inferences"], r["device"]),
            "last-seen": lambda r: (r["last_ts"], r["device"]),  # the quietest first
            "device": lambda r: r["device"],
        }
        rows.sort(key=order[sort])
        return len(rows), rows[offset:offset + limit]

    @property
    def dropped_total(self) -> int:
        self._fresh()
        return sum(d.dropped for d in self._devs.values())

    @property
    def inferences_total(self) -> int:
        self._fresh()
        return sum(a.inferences for a in self._aggs.values())


LATENCY_BOUNDS_S = tuple(b / 1000.0 for b in LATENCY_BUCKETS_MS)
