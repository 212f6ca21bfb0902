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
`offer` counts in memory; `flush` writes everything counted since the last flush in one
transaction, and the report consumer acknowledges the messages only after that, so a
window is counted exactly once across hub and NATS restarts.

Telemetry is not a lifecycle fact: these tables are not rebuilt from the ledger. What
the rollout controller concludes from them is, with the numbers, in the ledger.

With several hub processes (hub.commands.leadership) only the leader counts: the
aggregates and the per-boot dedupe are held here and written as totals, so two
counters would overwrite each other. `fence` (set by the hub) runs in the flush's
transaction and refuses a deposed leader's flush; a new leader `reload`s what the
previous one committed before it counts, and a standby reloads to answer reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, update
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
_COUNTER_VALUES = ("last_seen", "boot", "window_seq", "latency_ms_p95", "inferences", "errors")


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


class TelemetryIngest:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Raises inside the flush's transaction if this process may not count (it is
        # not the leader); None: it always may (one process).
        self.fence: Callable[[Connection], None] | None = None
        with engine.begin() as conn:
            for table in (AGG, DEVS, device_state.TELEMETRY):
                table.create(conn, checkfirst=True)
        self._load()

    def _load(self) -> None:
        """The counts as committed (at start, and after a flush that failed: what was
        counted since the last commit is forgotten, and counted again when JetStream
        redelivers the reports, which were not acknowledged)."""
        aggs: dict[tuple[str, str, int], _Agg] = {}
        with self.engine.connect() as conn:  # read fully before anything is replaced
            for r in conn.execute(select(AGG)).mappings():
                aggs[(r["device"], r["digest"], r["counter"])] = _Agg(
                    r["model"], r["version"], r["windows"], r["inferences"], r["errors"],
                    json.loads(r["latency_buckets"]), json.loads(r["output_hist"]),
                    r["first_ts"], r["last_ts"], stored=True)
            devs: dict[str, _Dev] = {
                r["device"]: _Dev(*_load_seen(r["seen"]), r["windows"], r["duplicates"],
                                  r["dropped"], stored=True)
                for r in conn.execute(select(DEVS)).mappings()
            }
        for (device, _, _), a in aggs.items():
            dev = devs.setdefault(device, _Dev())
            dev.inferences += a.inferences
            dev.errors += a.errors
        self._aggs = aggs
        self._devs = devs
        self._dirty_aggs: set[tuple[str, str, int]] = set()
        self._dirty_devs: set[str] = set()
        self._latest: dict[str, proto.TelemetryWindow] = {}
        self.windows_total = sum(d.windows for d in self._devs.values())
        self.duplicates_total = sum(d.duplicates for d in self._devs.values())
        self.last_lag_s = 0.0
        self.last_ingest_ns = 0

    # ------------------------------------------------------------ intake

    def check(self, w: proto.TelemetryWindow,
              output_shape: list[int] | None = None) -> None:
        """Refuse (ProtocolError) a window the aggregates cannot take: one whose counts
        would carry a sum past 2**63-1, or whose output histograms do not have the
        shape of the release's drift bins (`output_shape`, bins per output, when the
        hub knows the release) or, else, of the windows counted before for the same
        assignment. Changes nothing."""
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
        sums = [w.count + (a.inferences if a else 0), w.errors + (a.errors if a else 0),
                w.count + (dev.inferences if dev else 0), (a.windows + 1) if a else 1]
        if a is not None:
            sums += [x + y for x, y in zip(a.latency, w.latency_buckets, strict=False)]
            for mine, theirs in zip(a.outputs, w.output_hist, strict=False):
                sums += [x + y for x, y in zip(mine, theirs, strict=False)]
        if max(sums) > proto.MAX_INT64:
            raise proto.ProtocolError(
                "telemetry: the window's counts would carry the device's totals past "
                "2**63-1", reason="bounds")

    def offer(self, w: proto.TelemetryWindow) -> bool:
        """Count a window unless it was counted before; True if counted. The caller
        has `check`ed it."""
        dev = self._devs.setdefault(w.device, _Dev())
        self._dirty_devs.add(w.device)
        if not _first_time(dev, w.boot, w.seq):
            dev.duplicates += 1
            self.duplicates_total += 1
            return False
        if len(dev.seen) > MAX_BOOTS_REMEMBERED:  # oldest boots first (insertion order)
            for boot in list(dev.seen)[: len(dev.seen) - MAX_BOOTS_REMEMBERED]:
                del dev.seen[boot]
                dev.holes.pop(boot, None)
        dev.windows += 1
        dev.dropped = max(dev.dropped, w.dropped)
        self.windows_total += 1
        key = (w.device, w.digest, w.counter)
        agg = self._aggs.setdefault(key, _Agg(w.model, w.version, first_ts=w.start))
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
        self._dirty_aggs.add(key)
        self._latest[w.device] = w
        now = time.time_ns()
        self.last_ingest_ns = now
        self.last_lag_s = max(0.0, (now - w.end) / 1e9)
        return True

    def flush(self) -> None:
        """Write what was counted since the last flush, in one transaction. If it
        fails, the counts go back to what was committed (so nothing is marked stored,
        or seen, that is not in the database) and the error is raised: the caller
        must not acknowledge the reports counted since the last flush."""
        if not (self._dirty_aggs or self._dirty_devs):
            return
        try:
            self._write()
        except BaseException:
            self._load()
            raise

    def reload(self) -> None:
        """Read the counts as committed, dropping what was counted and not flushed (a
        new leader before it counts; a standby, whose reads would be stale)."""
        self._load()

    def rollback(self) -> None:
        """Forget what was counted since the last flush (its reports are redelivered)."""
        if self._dirty_aggs or self._dirty_devs:
            self._load()

    def _write(self) -> None:
        stored: list[_Agg | _Dev] = []  # marked stored only once the commit succeeded
        # Rows are grouped into one executemany per table and statement: a flush after a
        # fetched batch of 256 windows is a handful of statements, not ~800.
        with self.engine.begin() as conn:
            if self.fence is not None:
                self.fence(conn)
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            for key in sorted(self._dirty_aggs):
                a = self._aggs[key]
                row = {"device": key[0], "digest": key[1], "counter": key[2],
                       **self._agg_values(a)}
                (updates if a.stored else inserts).append(row)
                stored.append(a)
            if inserts:
                conn.execute(insert(AGG), inserts)
            if updates:
                conn.execute(update(AGG).where(
                    AGG.c.device == bindparam("k_device"), AGG.c.digest == bindparam("k_digest"),
                    AGG.c.counter == bindparam("k_counter")).values(
                        {c: bindparam(c) for c in _AGG_VALUES}),
                    [{**{c: r[c] for c in _AGG_VALUES}, "k_device": r["device"],
                      "k_digest": r["digest"], "k_counter": r["counter"]} for r in updates])
            inserts, updates = [], []
            for device in sorted(self._dirty_devs):
                d = self._devs[device]
                row = {"device": device, "seen": _dump_seen(d), "windows": d.windows,
                       "duplicates": d.duplicates, "dropped": d.dropped}
                (updates if d.stored else inserts).append(row)
                stored.append(d)
            if inserts:
                conn.execute(insert(DEVS), inserts)
            if updates:
                conn.execute(update(DEVS).where(DEVS.c.device == bindparam("k_device")).values(
                    {c: bindparam(c) for c in _DEV_VALUES}),
                    [{**{c: r[c] for c in _DEV_VALUES}, "k_device": r["device"]}
                     for r in updates])
            self._write_device_counters(conn)
        for item in stored:
            item.stored = True
        self._dirty_aggs.clear()
        self._dirty_devs.clear()
        self._latest.clear()

    @staticmethod
    def _agg_values(a: _Agg) -> dict[str, Any]:
        return {"model": a.model, "version": a.version, "windows": a.windows,
                "inferences": a.inferences, "errors": a.errors,
                "latency_buckets": json.dumps(a.latency), "output_hist": json.dumps(a.outputs),
                "first_ts": a.first_ts, "last_ts": a.last_ts}

    def _write_device_counters(self, conn: Connection) -> None:
        """The per-device totals `hub devices` shows (table device_telemetry)."""
        if not self._latest:
            return
        table = device_state.TELEMETRY
        existing = {r[0] for r in conn.execute(
            select(table.c.device).where(table.c.device.in_(list(self._latest))))}
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for device, w in self._latest.items():
            dev = self._devs[device]
            values = {"last_seen": w.end, "boot": w.boot, "window_seq": w.seq,
                      "latency_ms_p95": float(w.latency_ms_p95),
                      "inferences": dev.inferences, "errors": dev.errors}
            if device in existing:
                updates.append({**values, "k_device": device})
            else:
                inserts.append({**values, "device": device})
        if inserts:
            conn.execute(insert(table), inserts)
        if updates:
            conn.execute(update(table).where(table.c.device == bindparam("k_device")).values(
                {c: bindparam(c) for c in _COUNTER_VALUES}), updates)

    # ------------------------------------------------------------ views

    def view(self, assignments: Iterable[tuple[str, str, int]],
             reference: list[dict[str, Any]] | None) -> ro.TelemetryView:
        """Telemetry summed over (device, digest, counter) assignments, with PSI against
        the release's reference histograms (validation payload)."""
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
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for a in self._aggs.values():
            n, e = out.get((a.model, a.version), (0, 0))
            out[(a.model, a.version)] = (n + a.inferences, e + a.errors)
        return out

    def latency_by_model(self) -> dict[tuple[str, str], list[int]]:
        out: dict[tuple[str, str], list[int]] = {}
        for a in self._aggs.values():
            _add(out.setdefault((a.model, a.version), []), a.latency)
        return out

    def device_rows(self, device: str | None = None) -> list[dict[str, Any]]:
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
        return sum(d.dropped for d in self._devs.values())

    @property
    def inferences_total(self) -> int:
        return sum(a.inferences for a in self._aggs.values())


LATENCY_BOUNDS_S = tuple(b / 1000.0 for b in LATENCY_BUCKETS_MS)
