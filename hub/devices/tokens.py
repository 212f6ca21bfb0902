"""Device-made keys: one-time enrolment tokens (issue 12, class 9).

`hub device enroll ID` makes the device's key in the hub home (the demo's easy path).
Here the device makes its own key and the private half never leaves it:

1. an operator runs `hub device token create ID [--ttl 1h]` (the signed command
   `device.token`): the hub makes a random token, records `device.token_created` with
   the token's BLAKE3 hash only (`token_id` = its first 16 hex digits), and answers the
   token itself to that operator alone;
2. the device runs `edge-agent keygen` (its key, 0600) and `edge-agent enroll --token T
   --hub nats://enrol:PASSWORD@host:port`: it sends an `enrolment` request
   {device, public, token, ts} signed by its new key to `hub.enrol`, as the NATS user
   `enrol`, whose only rights are that subject and its inbox root `_INBOX_ENROL`;
3. the hub (`TokenEnrolment.handle`) checks the signature, finds the token by hash
   (compared in constant time), refuses it if unknown, for another device, expired or
   used, refuses a device id already enrolled and a key another device or operator
   holds, then records `device.enrolled` {device, public, token: token_id} (the token is
   used from then on) with the token's operator as actor, lets the device's NATS user in,
   and answers what the device needs to connect: the NATS URL, the trust root and the
   CA certificate (no private material).

A refusal is one line back to the device, counted per reason (`hub status`:
`refused_enrolments`), logged once per reason, and leaves the ledger as it was.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

import blake3
from sqlalchemy import Connection

from edge_agent import protocol as proto
from edge_agent.protocol.documents import MAX_ENROLMENT_REQUEST_BYTES
from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Effects, Outcome, Verbs, command_event
from hub.commands.writer import LedgerWriter
from hub.devices import state as device_state
from hub.errors import Refused
from hub.home.config import HubConfig
from hub.home.nats_config import auth_for, ca_path
from hub.home.nats_users import identity_holder
from ledger.signing import PublicKey
from ledger.storage.store import NewEvent

log = logging.getLogger("hub.enrolment")

ENROL_ROLE = "enrol"  # the NATS user of devices not enrolled yet (hub.home.nats_config)
DEFAULT_TOKEN_TTL_S = 3600
MAX_TOKEN_TTL_S = 30 * 86400

# Refusal reasons (the keys of TokenEnrolment.refused).
MALFORMED = "malformed"
BAD_SIGNATURE = "bad-signature"
UNKNOWN_TOKEN = "unknown-token"
OTHER_DEVICE = "token-for-another-device"
EXPIRED = "expired-token"
USED = "used-token"
ENROLLED = "already-enrolled"
KEY_IN_USE = "key-in-use"
REASONS = (MALFORMED, BAD_SIGNATURE, UNKNOWN_TOKEN, OTHER_DEVICE, EXPIRED, USED, ENROLLED,
           KEY_IN_USE)


class EnrolmentRefused(Refused):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def token_hash(token: str) -> str:
    return blake3.blake3(token.encode()).hexdigest()


class TokenCommands:
    """`device.token`: make a one-time enrolment token for a device id."""

    def __init__(self, config: HubConfig, clock: Callable[[], int]) -> None:
        self.config = config
        self.clock = clock

    def handlers(self) -> Verbs:
        return Verbs(writes={"device.token": self.create})

    def create(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        body = Body(cmd.body)
        device = body.text("device")
        proto.check_device_id(device)
        ttl_s = body.whole_number("ttl_s", DEFAULT_TOKEN_TTL_S, 1, MAX_TOKEN_TTL_S)
        if device_state.get_device(conn, device) is not None:
            raise CommandError(f"device {device} is already enrolled")
        token = secrets.token_urlsafe(32)  # 256 bits: not guessable, not in the ledger
        digest = token_hash(token)
        expires = self.clock() + ttl_s * 10**9
        event = command_event(cmd, ev.DEVICE_TOKEN_CREATED, ev.device_subject(device), {
            "device": device, "token_id": digest[:16], "token_hash": digest,
            "expires": expires})
        result = {"device": device, "token": token, "token_id": digest[:16],
                  "expires": expires, "enrol_url": enrol_url(self.config)}
        return Outcome([event], result, [])


class TokenEnrolment:
    """Answers `hub.enrol` requests (hub.service.nats.NatsEdge.serve_enrolment)."""

    def __init__(self, config: HubConfig, writer: LedgerWriter, effects: Effects,
                 clock: Callable[[], int]) -> None:
        self.config = config
        self.writer = writer
        self.effects = effects
        self.clock = clock
        self.refused: Counter[str] = Counter()

    async def handle(self, data: bytes) -> dict[str, Any]:
        """The reply to one request: {"ok": true, "result": ...} or {"ok": false,
        "error": one line}."""
        try:
            result = await self._enrol(data)
        except EnrolmentRefused as exc:
            if not self.refused[exc.reason]:
                log.warning("enrolment refused: %s (logged once per reason)", exc)
            self.refused[exc.reason] += 1
            return {"ok": False, "error": f"enrolment refused: {exc}"}
        return {"ok": True, "result": result}

    async def _enrol(self, data: bytes) -> dict[str, Any]:
        request = _decode(data)
        device, public = request.device, request.public
        digest = token_hash(request.token)
        async with self.writer.lock:  # judged and written with no other write between
            with self.writer.store.engine.connect() as conn:
                token_id, creator = self._check(conn, request, digest)
            # The operator who made the token is the actor: it allowed this enrolment.
            entries = await self.writer.append([NewEvent(
                ev.DEVICE_ENROLLED, creator, ev.device_subject(device),
                {"device": device, "public": public, "token": token_id})])
        # Answered once the server has the device's NATS user, like `device.enroll`.
        await self.effects.sync_nats_users(wait=True)
        ca = ca_path(self.config.home)
        log.info("device %s enrolled with its own key %s (token %s)", device,
                 PublicKey(public).keyid, token_id)
        return {"device": device, "keyid": PublicKey(public).keyid,
                "seq": [e.seq for e in entries], "nats_url": self.config.nats_url,
                "trust_root": self.config.trust_root_path.read_bytes(),
                "ca": ca.read_bytes() if ca is not None else b""}

    def _check(self, conn: Connection, request: proto.EnrolmentRequest, digest: str
               ) -> tuple[str, str]:
        """(token id, its operator) if the token may enrol this request's device and key."""
        row = device_state.get_token(conn, digest[:16])
        # The full hash, in constant time: the id only finds the row.
        if row is None or not hmac.compare_digest(str(row["token_hash"]), digest):
            raise EnrolmentRefused(UNKNOWN_TOKEN, "unknown enrolment token")
        if row["device"] != request.device:
            raise EnrolmentRefused(OTHER_DEVICE, f"the token is not for device "
                                                 f"{request.device}")
        if row["used_seq"] is not None:
            raise EnrolmentRefused(USED, "the token was used already (ledger seq "
                                         f"{row['used_seq']}); ask for a new one")
        if self.clock() > int(row["expires"]):
            raise EnrolmentRefused(EXPIRED, "the token has expired; ask for a new one")
        if device_state.get_device(conn, request.device) is not None:
            raise EnrolmentRefused(ENROLLED, f"device {request.device} is already enrolled")
        holder = identity_holder(conn, request.public)
        if holder is not None:
            raise EnrolmentRefused(KEY_IN_USE, f"key {PublicKey(request.public).keyid} is "
                                               f"already the key of {holder}: every device "
                                               "needs a key of its own")
        return str(row["token_id"]), str(row["created_by"])


def enrol_url(config: HubConfig) -> str:
    """The hub's NATS URL as the `enrol` user (its password in it: it only lets a device
    ask for enrolment); unchanged for a home without NATS identities."""
    auth = auth_for(config.home, ENROL_ROLE)
    if auth.user is None:
        return config.nats_url
    urls = []
    for url in config.nats_url.split(","):  # every node of a cluster: it fails over
        scheme, rest = url.strip().split("://", 1) if "://" in url else ("nats", url.strip())
        urls.append(f"{scheme}://{auth.user}:{auth.password}@{rest}")
    return ",".join(urls)


def _decode(data: bytes) -> proto.EnrolmentRequest:
    if len(data) > MAX_ENROLMENT_REQUEST_BYTES:
        raise EnrolmentRefused(MALFORMED, "request is too large")
    try:
        envelope = proto.SignedEnvelope.decode(data, "enrolment request")
        request = proto.EnrolmentRequest.from_map(
            envelope.document(proto.DOMAIN_ENROLMENT))
        proto.check_device_id(request.device)
    except (proto.ProtocolError, ValueError) as exc:
        raise EnrolmentRefused(MALFORMED, f"malformed request: {exc}") from exc
    if len(request.public) != 32:
        raise EnrolmentRefused(MALFORMED, "'public' must be a 32-byte Ed25519 public key")
    key = PublicKey(request.public)
    # Signed by the key it enrols: the device holds the private half.
    if not any(s.keyid == key.keyid and key.verify(proto.DOMAIN_ENROLMENT, envelope.signed,
                                                   s.sig) for s in envelope.signatures):
        raise EnrolmentRefused(BAD_SIGNATURE, "the request is not signed by the key it "
                                              "enrols")
    return request
