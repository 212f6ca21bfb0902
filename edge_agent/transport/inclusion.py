"""Wait for a release's transparency proof (the agent's `--require-inclusion`).

The proof itself is checked by the pure edge_agent.trust.inclusion; this module only
fetches it from an `UpdateSource`, again and again, until it is there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from edge_agent.errors import InclusionPending, InclusionRefused, NotPublished, TransferError
from edge_agent.protocol.documents import Assignment
from edge_agent.protocol.names import transparency_key
from edge_agent.transport import UpdateSource
from edge_agent.trust.inclusion import verify_release_inclusion
from edge_agent.trust.root import TrustRoot
from ledger.bundle import BundleReport

log = logging.getLogger("edge_agent.transparency")


async def wait_for_inclusion(
    source: UpdateSource,
    root: Callable[[], TrustRoot],
    assignment: Assignment,
    max_delay: float = 5.0,
) -> BundleReport:
    """Fetch and check the release's bundle until it is there. Waits, with a log line,
    while there is none or the trust root lists no witnesses yet; raises
    `InclusionRefused` for a bundle that does not hold. Cancel the task to stop waiting."""
    key = transparency_key(assignment.model, assignment.version)
    delay, said = 0.25, ""
    while True:
        try:
            data = await source.inclusion_bundle(key)
            report = verify_release_inclusion(root(), data, assignment)
            log.info("transparency: %s/%s is entry %d in checkpoint %d cosigned by %s",
                     assignment.model, assignment.version, report.entry.seq,
                     report.checkpoint.checkpoint.size, ", ".join(report.witnesses))
            return report
        except (NotPublished, InclusionPending) as exc:
            why = str(exc)
        except (asyncio.CancelledError, InclusionRefused):
            raise
        except TransferError as exc:  # disconnected, timed out: try again
            why = str(exc)
        except Exception as exc:
            why = f"cannot read the transparency proof: {exc!r}"
        if why != said:
            log.warning("waiting for witnesses: %s/%s (assignment %d) is not installed until "
                        "its release is in a witnessed checkpoint (%s)", assignment.model,
                        assignment.version, assignment.counter, why)
            said = why
        await asyncio.sleep(delay)
        delay = min(max_delay, delay * 2)
