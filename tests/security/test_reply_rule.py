"""The reply rule itself (hub/home/replies.py), subject by subject, without a server."""

from __future__ import annotations

import logging

import pytest

from hub.home.replies import (
    BAD_CHARACTER,
    EMPTY_TOKEN,
    NOT_AN_INBOX,
    NOT_THE_SIGNERS_INBOX,
    SYSTEM_SUBJECT,
    TOO_LONG,
    WILDCARD,
    ReplyGuard,
    operator_reply_refusal,
    public_reply_refusal,
)

KEY = "ab" * 16
OTHER = "cd" * 16
MINE = f"_INBOX_OPERATOR.{KEY}.nuid.1"

REFUSED_FOR_EVERYONE = [
    ("$JS.API.STREAM.PURGE.KV_assignments", SYSTEM_SUBJECT),
    ("$JS.API.CONSUMER.DELETE.REPORTS.hub-reports", SYSTEM_SUBJECT),
    ("$KV.assignments.dev-1", SYSTEM_SUBJECT),
    ("$O.models.M.Zm9v", SYSTEM_SUBJECT),
    ("$SYS.REQ.SERVER.PING", SYSTEM_SUBJECT),
    ("fleet.report.dev-1.status", None),
    ("ledger.entry", None),
    ("hub.api.device.enroll", None),
    ("_INBOX_HUB.abc.1", None),
    ("_INBOX.*", WILDCARD),
    ("_INBOX.>", WILDCARD),
    ("_INBOX.a*b", WILDCARD),
    (f"_INBOX_OPERATOR.{KEY}.>", WILDCARD),
    ("_INBOX..x", EMPTY_TOKEN),
    ("_INBOX.x.", EMPTY_TOKEN),
    (".x", EMPTY_TOKEN),
    ("_INBOX", None),
    ("_INBOX.a b", BAD_CHARACTER),
    ("_INBOX.a\tb", BAD_CHARACTER),
    ("_INBOX.\u00e9", BAD_CHARACTER),
    ("_INBOX." + "x" * 300, TOO_LONG),
    ("_R_", None),
    ("_R_.*", WILDCARD),
    ("_R_.>", WILDCARD),
    ("_R_..x", EMPTY_TOKEN),
    ("$_R_.a.b", SYSTEM_SUBJECT),
]


@pytest.mark.parametrize(("reply", "reason"), REFUSED_FOR_EVERYONE)
def test_what_no_responder_answers(reply: str, reason: str | None) -> None:
    public = public_reply_refusal(reply)
    signed = operator_reply_refusal(reply, KEY)
    unreadable = operator_reply_refusal(reply, None)
    assert public is not None and signed is not None and unreadable is not None
    if reason is not None:
        assert public == signed == unreadable == reason
    else:
        assert public == NOT_AN_INBOX and signed == unreadable == NOT_THE_SIGNERS_INBOX


def test_a_signed_command_is_answered_only_in_its_signers_inbox() -> None:
    assert operator_reply_refusal(MINE, KEY) is None
    for reply in (f"_INBOX_OPERATOR.{OTHER}.nuid.1", f"_INBOX_OPERATOR.{KEY}",
                  f"_INBOX_OPERATOR.{KEY}x.1", "_INBOX.dev-1.x", "_INBOX.nuid"):
        assert operator_reply_refusal(reply, KEY) == NOT_THE_SIGNERS_INBOX, reply
    # A made-up actor cannot widen the prefix.
    assert operator_reply_refusal(MINE, f"{KEY}.nuid") == NOT_THE_SIGNERS_INBOX
    assert operator_reply_refusal(MINE, "*") == NOT_THE_SIGNERS_INBOX
    # Unreadable command: some operator's inbox only.
    assert operator_reply_refusal(f"_INBOX_OPERATOR.{OTHER}.n", None) is None
    assert operator_reply_refusal("_INBOX.nuid.1", None) == NOT_THE_SIGNERS_INBOX


def test_unsigned_requests_are_answered_in_inboxes() -> None:
    for reply in ("_INBOX.nuid", "_INBOX.nuid.1", MINE):
        assert public_reply_refusal(reply) is None, reply
    for reply in (f"_INBOX_OPERATOR.{KEY}", "_INBOXES.x", "INBOX.x", "_inbox.x"):
        assert public_reply_refusal(reply) == NOT_AN_INBOX, reply


def test_the_guard_counts_each_refusal_and_logs_once_per_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = ReplyGuard()
    with caplog.at_level(logging.WARNING, logger="hub.replies"):
        for _ in range(5):
            assert not guard.public_reply("$KV.assignments.x", "ledger.api.checkpoint")
            assert not guard.operator_reply("_INBOX.x", KEY, "hub.api.status")
        assert guard.public_reply("_INBOX.x", "ledger.api.checkpoint")
        assert guard.operator_reply(MINE, KEY, "hub.api.status")
    assert guard.counts == {SYSTEM_SUBJECT: 5, NOT_THE_SIGNERS_INBOX: 5}
    assert guard.refused == 10
    assert len([r for r in caplog.records if r.name == "hub.replies"]) == 2


def test_a_reply_the_server_mapped_for_a_service_import_is_answered() -> None:
    """`_R_.<token>...`: nats-server's reply for a request that came through a service
    import; the answer reaches only the requester's own account (hub/home/replies.py),
    so neither the signer-inbox rule nor the inbox rule applies to it."""
    for reply in ("_R_.qy4h3s.YIFIBA", "_R_.x"):
        assert public_reply_refusal(reply) is None, reply
        assert operator_reply_refusal(reply, KEY) is None, reply
        assert operator_reply_refusal(reply, None) is None, reply
