"""Signed operator commands (pure): what a person sends, and how the hub checks it.

An operator command is a signed envelope (edge_agent.protocol.SignedEnvelope) over

    {"type": "operator-command", "verb": str, "body": map, "actor": keyid,
     "nonce": 16 random bytes as hex, "time": UTC ns, "audience": the hub's origin}

signed by the operator's own Ed25519 key under the domain `operator-command`. The hub
checks the command names it (`audience` = its ledger origin, so a command signed for
one hub is refused by every other), that the key is a known, unrevoked operator with a
role that allows the verb, that the time is fresh, and that the nonce was never used;
the envelope is kept in the ledger event so an auditor can check who asked for it
without trusting the hub.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge_agent.protocol import ProtocolError, SignedEnvelope, decode_map
from hub.errors import Refused
from ledger.signing import PublicKey, SigningKey

DOMAIN_COMMAND: Final = "operator-command"
MAX_CLOCK_SKEW_NS: Final = 5 * 60 * 10**9
# The one unsigned verb: it answers {"audience": the hub's origin}, what to sign for.
AUDIENCE_VERB: Final = "audience"
ROLES: Final = ("registrant", "approver", "operator", "auditor", "admin")

# verb -> roles that may issue it. Reads are open to every known operator.
VERB_ROLES: Final[dict[str, tuple[str, ...]]] = {
    "model.register": ("registrant",),
    "model.validate": ("registrant", "operator"),
    "model.validation.cancel": ("registrant", "operator"),
    "model.approve": ("approver",),
    "model.reject": ("approver",),
    "model.release": ("operator",),
    "model.deprecate": ("operator", "admin"),
    "model.revoke": ("operator", "admin"),
    "model.rebase": ("operator",),
    "device.enroll": ("operator", "admin"),
    "device.revoke": ("admin",),
    "device.token": ("operator", "admin"),
    "deploy": ("operator",),
    "device.tag": ("operator", "admin"),
    "rollout.create": ("operator",),
    "rollout.start": ("operator",),
    "rollout.pause": ("operator",),
    "rollout.resume": ("operator",),
    "rollout.abort": ("operator",),
    "rollout.rollback": ("operator",),
    "operator.add": ("admin",),
    "operator.revoke": ("admin",),
    "keys.rotate": ("admin",),
    "keys.revoke": ("admin",),
    "keys.import_root": ("admin",),
    "witness.add": ("admin",),
    "witness.remove": ("admin",),
}
READ_VERBS: Final = frozenset(
    {"status", "models", "model.show", "model.history", "devices", "operators", "whoami",
     "keys", "device.history", "device.show", "rollouts", "rollout.status", "telemetry",
     "policy.show", "model.validation"}
)


class CommandRefused(Refused):
    """The command is not allowed; the message says why and what would be."""


@dataclass(frozen=True)
class Operator:
    name: str
    keyid: str
    public: bytes
    roles: tuple[str, ...]
    revoked: bool = False


@dataclass(frozen=True)
class VerifiedCommand:
    verb: str
    body: dict[str, Any]
    operator: Operator
    nonce: str
    time: int
    envelope: bytes  # exactly what was signed and sent, for the ledger


def sign_command(key: SigningKey, verb: str, body: Mapping[str, Any],
                 now: int | None = None, *, audience: str | None) -> bytes:
    """A signed command for the hub whose origin is `audience` (None: a command that
    names no hub, as clients before audiences sent; hubs refuse it)."""
    document: dict[str, Any] = {
        "type": "operator-command",
        "verb": verb,
        "body": dict(body),
        "actor": key.keyid,
        "nonce": secrets.token_hex(16),
        "time": now if now is not None else time.time_ns(),
    }
    if audience is not None:
        document["audience"] = audience
    return SignedEnvelope.sign(document, DOMAIN_COMMAND, [key]).encode()


def claimed_actor(data: bytes) -> str | None:
    """The operator key id a command says it is from, unchecked (None: unreadable). The
    NATS edge uses it to choose where an answer may go before the command is opened."""
    try:
        actor = SignedEnvelope.decode(data, "operator command").document(
            "operator command").get("actor")
    except ProtocolError:
        return None
    return actor if isinstance(actor, str) else None


def open_command(
    data: bytes,
    verb: str,
    lookup: Mapping[str, Operator],
    nonce_used: Iterable[str] | Any,
    now: int | None = None,
    *,
    audience: str,
) -> VerifiedCommand:
    """Check a command sent on `hub.api.<verb>` to the hub whose origin is `audience`;
    raise CommandRefused with the reason."""
    try:
        envelope = SignedEnvelope.decode(data, "operator command")
        doc = envelope.document("operator command")
    except ProtocolError as exc:
        raise CommandRefused(f"unsigned or malformed command: {exc}") from exc
    if doc.get("type") != "operator-command":
        raise CommandRefused("not an operator command; sign it with the hub CLI")
    signed_verb, body, actor = doc.get("verb"), doc.get("body"), doc.get("actor")
    nonce, sent = doc.get("nonce"), doc.get("time")
    if not (isinstance(signed_verb, str) and isinstance(body, dict) and isinstance(actor, str)
            and isinstance(nonce, str) and isinstance(sent, int) and not isinstance(sent, bool)):
        raise CommandRefused("operator command is missing verb, body, actor, nonce or time")
    if signed_verb != verb:
        raise CommandRefused(f"command was signed for {signed_verb!r} but sent to {verb!r}")
    signed_for = doc.get("audience")
    if signed_for is None:
        raise CommandRefused(
            "command names no hub (no audience): it comes from a client older than this "
            "hub; upgrade fleetledger (the `hub` CLI, HubClient) and send it again"
        )
    if signed_for != audience:
        raise CommandRefused(
            f"command was signed for hub {str(signed_for)[:200]!r}, not this hub "
            f"({audience!r}); sign it for this hub (its config.toml origin)"
        )
    operator = lookup.get(actor)
    if operator is None:
        raise CommandRefused(
            f"unknown operator key {actor}; an admin must add it with `hub operator add`"
        )
    if operator.revoked:
        raise CommandRefused(f"operator {operator.name} (key {actor}) has been revoked")
    sigs = [s for s in envelope.signatures if s.keyid == actor]
    if not sigs or not PublicKey(operator.public).verify(DOMAIN_COMMAND, envelope.signed,
                                                         sigs[0].sig):
        raise CommandRefused(f"signature of {operator.name} on this command does not verify")
    current = now if now is not None else time.time_ns()
    if abs(current - sent) > MAX_CLOCK_SKEW_NS:
        raise CommandRefused(
            f"command is stale or from the future ({(current - sent) / 1e9:+.0f} s); "
            "check the clock and send it again"
        )
    if nonce in nonce_used:
        raise CommandRefused("replayed command: this nonce was already used")
    if verb not in READ_VERBS:
        allowed = VERB_ROLES.get(verb)
        if allowed is None:
            raise CommandRefused(f"unknown command {verb!r}")
        if not set(allowed) & set(operator.roles):
            raise CommandRefused(
                f"{operator.name} has role(s) {', '.join(operator.roles) or 'none'}; "
                f"{verb} needs {' or '.join(allowed)}"
            )
    return VerifiedCommand(verb, body, operator, nonce, sent, data)


def command_actor_and_signature(envelope: bytes) -> tuple[str, str, bytes, bytes]:
    """(keyid, verb, signed bytes, signature) of a stored command, for auditors."""
    env = SignedEnvelope.decode(envelope, "operator command")
    doc = decode_map(env.signed, "operator command")
    keyid = str(doc.get("actor", ""))
    sig = next((s.sig for s in env.signatures if s.keyid == keyid), b"")
    return keyid, str(doc.get("verb", "")), env.signed, sig


def command_signature_valid(envelope: bytes, public: bytes) -> bool:
    try:
        _, _, signed, sig = command_actor_and_signature(envelope)
    except ProtocolError:
        return False
    return PublicKey(public).verify(DOMAIN_COMMAND, signed, sig)
