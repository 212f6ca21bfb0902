"""The one rule for which reply subjects the hub answers (docs/PROTOCOL.md "Permissions").

The hub's NATS user may publish anywhere in its account (HUB): it owns the streams and
the buckets. A request's reply subject is chosen by whoever sent it, and NATS subject
permissions do not restrict it. Answering blindly would make the hub a confused deputy:
an answer aimed at `$JS.API.STREAM.PURGE.<stream>` purges the stream, one aimed at
`$KV.assignments.<device>` overwrites that device's assignment, one aimed at
`fleet.report.<device>.status` or `ledger.entry` lands in a stream. So every responder
the hub runs asks `ReplyGuard` first, and sends nothing to a subject it refuses.

With the hub's NATS configuration (auth on, hub/home/nats_config.py) nobody but the hub
is in HUB: operators and witnesses reach `hub.api.>`, `ledger.api.>` and
`ledger.cosignature` through service imports, and nats-server replaces the reply
subject of every such request with a fresh `_R_.<token>.<token>` mapping of its own.
An answer published there is delivered to the requester's reply subject *in the
requester's account* (OPERATORS, WITNESS), once, and nowhere else: it cannot reach a
stream, a KV key or the ledger feed of HUB. So the hub answers `_R_.` replies:

- their true destination is invisible to the hub, so the signer-inbox check below
  cannot apply: at worst an operator aims the answer to its command at another
  operator's inbox inside OPERATORS (or a witness at another auditor's `_INBOX.` in
  WITNESS); the answer is a plain reply map, and nats-py drops a reply that matches
  no request it is waiting for. Nothing there is a stream: OPERATORS and WITNESS have
  no JetStream;
- nobody outside HUB can name an `_R_.` reply that reaches the hub unmapped (the
  server maps every reply crossing a service import).

Without auth (`hub init --no-auth`, one global account, everyone with every right) the
rule is the same; `_R_.` replies do not occur there unless a client picks one, and such a
client may write to any subject itself. Every other reply subject:

- a signed operator command (`hub.api.<verb>`) is answered only under the inbox
  prefix of the operator that the command names (`_INBOX_OPERATOR.<keyid>.`, the only
  prefix that operator's NATS user may subscribe to); a command whose actor cannot be
  read is answered only under some operator's inbox prefix, and its command is not run;
- an unsigned request (the public ledger API, cosignatures from witnesses) is answered
  only under `_INBOX.` or `_INBOX_OPERATOR.`;
- an enrolment request (`hub.enrol`, hub/devices/tokens.py) is answered, and run, only
  under `_INBOX_ENROL.` (the only inbox root the `enrol` user may subscribe to) or a
  `_R_.` mapping (it came through the ENROL account's import);
- in all cases the subject has at least one token after the prefix, no empty token, no
  wildcard (`*`, `>`), no space or control character, and at most MAX_REPLY_BYTES; it
  never starts with `$` (JetStream, KV, Object Store, system subjects) and never lies
  under the hub's own inbox prefix (HUB_INBOX_PREFIX), where the hub's own requests
  (its JetStream calls) wait for their answers.

A refused reply is counted per reason (`counts`, shown by `hub status`) and logged once
per reason; the request is dropped and the hub keeps serving.
"""

from __future__ import annotations

import logging
from collections import Counter

from edge_agent.protocol.names import ENROL_INBOX_ROOT
from hub.home.nats_config import OPERATOR_INBOX_ROOT, operator_inbox_prefix

log = logging.getLogger("hub.replies")

# Where the hub's own connection takes its reply inboxes: a root no other identity may
# subscribe to, and one the hub never answers a request under.
HUB_INBOX_PREFIX = "_INBOX_HUB"
# Inbox roots of identities that send unsigned requests: witnesses and auditors (nats-py's
# default `_INBOX.`) and operators (their own `_INBOX_OPERATOR.<keyid>.`).
PUBLIC_INBOX_ROOTS = ("_INBOX", OPERATOR_INBOX_ROOT)
# nats-server's reply mapping for a request that came through a service import.
SERVICE_REPLY_ROOT = "_R_"
MAX_REPLY_BYTES = 256

# Reasons (the keys of ReplyGuard.counts).
TOO_LONG = "too-long"
BAD_CHARACTER = "bad-character"
EMPTY_TOKEN = "empty-token"
WILDCARD = "wildcard"
SYSTEM_SUBJECT = "system-subject"
NOT_AN_INBOX = "not-an-inbox"
NOT_THE_SIGNERS_INBOX = "not-the-signers-inbox"
REASONS = (TOO_LONG, BAD_CHARACTER, EMPTY_TOKEN, WILDCARD, SYSTEM_SUBJECT, NOT_AN_INBOX,
           NOT_THE_SIGNERS_INBOX)


def _shape(reply: str) -> str | None:
    """Why `reply` is not a well-formed, literal subject (None: it is)."""
    if len(reply.encode()) > MAX_REPLY_BYTES:
        return TOO_LONG
    if any(not ("!" <= ch <= "~") for ch in reply):  # printable ASCII, no space
        return BAD_CHARACTER
    tokens = reply.split(".")
    if any(not t for t in tokens):
        return EMPTY_TOKEN
    if any("*" in t or ">" in t for t in tokens):
        return WILDCARD
    if reply.startswith("$"):
        return SYSTEM_SUBJECT
    return None


def _under(reply: str, prefix: str) -> bool:
    """`reply` lies strictly under `prefix` (at least one token after it)."""
    return reply.startswith(prefix + ".") and len(reply) > len(prefix) + 1


def _service_reply(reply: str) -> bool:
    """A reply subject nats-server made for a request through a service import."""
    return _under(reply, SERVICE_REPLY_ROOT)


def operator_reply_refusal(reply: str, actor: str | None) -> str | None:
    """Why the hub must not answer a `hub.api` command at `reply` (None: it may).
    `actor` is the operator key id the command names (None: unreadable)."""
    bad = _shape(reply)
    if bad is not None:
        return bad
    if _service_reply(reply):
        return None  # delivered only inside the requester's account (module docstring)
    if actor is not None:
        if _shape(actor) is not None or "." in actor:
            return NOT_THE_SIGNERS_INBOX
        return None if _under(reply, operator_inbox_prefix(actor)) else NOT_THE_SIGNERS_INBOX
    tokens = reply.split(".")
    if tokens[0] == OPERATOR_INBOX_ROOT and len(tokens) >= 3:
        return None
    return NOT_THE_SIGNERS_INBOX


def public_reply_refusal(reply: str) -> str | None:
    """Why the hub must not answer an unsigned request (ledger API, cosignature) at
    `reply` (None: it may)."""
    bad = _shape(reply)
    if bad is not None:
        return bad
    if _service_reply(reply):
        return None
    tokens = reply.split(".")
    if tokens[0] == OPERATOR_INBOX_ROOT:
        return None if len(tokens) >= 3 else NOT_AN_INBOX
    if tokens[0] in PUBLIC_INBOX_ROOTS and len(tokens) >= 2:
        return None
    return NOT_AN_INBOX


def enrol_reply_refusal(reply: str) -> str | None:
    """Why the hub must not answer an enrolment request at `reply` (None: it may): only
    under `_INBOX_ENROL.`, the one inbox root the `enrol` user may subscribe to."""
    bad = _shape(reply)
    if bad is not None:
        return bad
    if _service_reply(reply):
        return None  # through the ENROL account's import: the answer goes back there
    return None if _under(reply, ENROL_INBOX_ROOT) else NOT_AN_INBOX


class ReplyGuard:
    """Counts and logs the replies the hub's responders refuse (one guard per hub)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @property
    def refused(self) -> int:
        return sum(self.counts.values())

    def _verdict(self, reason: str | None, reply: str, where: str) -> bool:
        if reason is None:
            return True
        if not self.counts[reason]:
            log.warning("refused to answer %s at reply subject %r (%s); not answering "
                        "such requests (logged once per reason)", where, reply[:80], reason)
        self.counts[reason] += 1
        return False

    def operator_reply(self, reply: str, actor: str | None, where: str) -> bool:
        """True when the hub may answer the `hub.api` command at `reply`."""
        return self._verdict(operator_reply_refusal(reply, actor), reply, where)

    def enrol_reply(self, reply: str, where: str) -> bool:
        """True when the hub may answer the enrolment request at `reply`."""
        return self._verdict(enrol_reply_refusal(reply), reply, where)

    def public_reply(self, reply: str, where: str) -> bool:
        """True when the hub may answer the unsigned request at `reply`."""
        return self._verdict(public_reply_refusal(reply), reply, where)
