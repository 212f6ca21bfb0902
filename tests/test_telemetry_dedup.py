"""Telemetry de-duplication counts each window once, also when windows arrive out of
order (a fetch lost in a NATS restart is redelivered after newer windows), and keeps
that knowledge across a hub restart. Pure: SQLite, no server."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, update

from edge_agent import protocol as proto
from hub.telemetry.ingest import DEVS, MAX_HOLES, TelemetryIngest


def window(seq: int, boot: str = "b1", device: str = "d1") -> proto.TelemetryWindow:
    return proto.TelemetryWindow(
        device=device, boot=boot, seq=seq, model="kws", version="1", digest="d", start=1,
        end=2, count=10, errors=0, latency_ms_p50=0.1, latency_ms_p95=0.2,
        latency_ms_max=0.3, counter=1)


def test_a_late_window_below_a_newer_one_counts_once(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}")
    ingest = TelemetryIngest(engine)
    assert ingest.offer(window(1))
    assert ingest.offer(window(4))  # 2 and 3 are still in flight
    assert ingest.offer(window(3))  # late, never seen: counted
    assert not ingest.offer(window(3))  # a redelivery
    assert not ingest.offer(window(4))
    assert not ingest.offer(window(1))
    ingest.flush()

    again = TelemetryIngest(engine)  # a hub restart: the skipped seq 2 is remembered
    assert again.windows_total == 3
    assert again.offer(window(2))
    assert not again.offer(window(2))
    assert not again.offer(window(3))
    assert again.offer(window(1, boot="b2"))  # another boot counts on its own
    assert again.windows_total == 5 and again.duplicates_total == 3 + 2


def test_only_the_latest_skipped_seqs_are_remembered(tmp_path: Path) -> None:
    ingest = TelemetryIngest(create_engine(f"sqlite:///{tmp_path / 't.db'}"))
    far = 10 * MAX_HOLES
    assert ingest.offer(window(far))
    assert ingest.offer(window(far - MAX_HOLES))  # within the bound: still counted
    assert not ingest.offer(window(far - MAX_HOLES - 1))  # beyond it: taken as seen


def test_rows_written_before_holes_were_kept_still_load(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}")
    ingest = TelemetryIngest(engine)
    ingest.offer(window(5))
    ingest.flush()
    with engine.begin() as conn:  # the older format: {boot: highest}
        conn.execute(update(DEVS).values(seen='{"b1": 5}'))
    again = TelemetryIngest(engine)
    assert not again.offer(window(5))
    assert again.offer(window(6))


def test_a_failed_flush_keeps_nothing_it_did_not_commit(tmp_path: Path) -> None:
    """Issue 13: a failed flush marked rows stored before its commit, so the next flush
    updated rows that did not exist and the windows were lost. Now a failed flush goes
    back to what was committed; the redelivered window counts once."""
    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}")
    ingest = TelemetryIngest(engine)
    assert ingest.offer(window(1))
    ingest.flush()
    assert ingest.offer(window(2)) and ingest.offer(window(1, device="d2"))
    real = ingest._write_device_counters

    def disk_full(conn: object) -> None:
        raise OSError("database or disk is full")

    ingest._write_device_counters = disk_full  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk is full"):
        ingest.flush()
    assert ingest.windows_total == 1  # back to what was committed
    ingest._write_device_counters = real  # type: ignore[method-assign]
    assert ingest.offer(window(2)) and ingest.offer(window(1, device="d2"))  # redelivered
    ingest.flush()
    again = TelemetryIngest(engine)
    assert again.windows_total == 3
    assert sum(r["inferences"] for r in again.device_rows()) == 30
