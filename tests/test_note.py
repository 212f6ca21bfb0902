"""C2SP signed notes and Ed25519 cosignature keys (ledger/note.py): known answers from
Go's golang.org/x/mod/sumdb/note and transparency-dev/formats, round trips, and every
malformed input refused with a clear error. Pure, no I/O."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import LedgerError, NoteError, UnverifiedNoteError
from ledger.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    MAX_NOTE_BYTES,
    CosignatureSigner,
    CosignatureVerifier,
    Signature,
    Signer,
    Verifier,
    add_signatures,
    cosignature_message,
    cosignature_timestamp,
    key_hash,
    open_note,
    parse_note,
    parse_vkey,
    sign_note,
)
from ledger.signing import SigningKey

# From golang.org/x/mod/sumdb/note (note.go package doc and note_test.go).
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_B64 = (
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)
ENOCH_B64 = (
    "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ="
)
PETER_SIG = f"\u2014 PeterNeumann {PETER_B64}\n"
ENOCH_SIG = f"\u2014 EnochRoot {ENOCH_B64}\n"
SIGNED = (TEXT + "\n" + PETER_SIG).encode()


def _sig(name: str, b64: str) -> Signature:
    raw = base64.b64decode(b64)
    return Signature(name, int.from_bytes(raw[:4], "big"), raw[4:])


PETER = _sig("PeterNeumann", PETER_B64)
ENOCH = _sig("EnochRoot", ENOCH_B64)


def peter() -> Verifier:
    v = parse_vkey(PETER_VKEY)
    assert isinstance(v, Verifier)
    return v


def enoch() -> Verifier:
    v = parse_vkey(ENOCH_VKEY)
    assert isinstance(v, Verifier)
    return v


# -- known answers ----------------------------------------------------------------------


def test_go_signer_key_gives_the_go_verifier_key_and_signature() -> None:
    signer = Signer.from_skey(PETER_SKEY)
    assert signer.name == "PeterNeumann"
    assert signer.key_hash == 0xC74F20A3
    assert signer.vkey() == PETER_VKEY
    assert signer.skey() == PETER_SKEY
    assert sign_note(TEXT, [signer]) == SIGNED


def test_key_hash_is_sha256_of_name_newline_type_key() -> None:
    v = peter()
    expected = hashlib.sha256(b"PeterNeumann\n\x01" + v.public_key).digest()[:4]
    assert v.key_hash == int.from_bytes(expected, "big") == 0xC74F20A3
    assert key_hash("PeterNeumann", ALG_ED25519, v.public_key) == 0xC74F20A3


def test_open_go_note() -> None:
    note = open_note(SIGNED, [peter()])
    assert note.text == TEXT
    assert note.sigs == (PETER,)
    assert note.unverified_sigs == ()
    assert PETER.key_id == "PeterNeumann+c74f20a3"


def test_open_one_verified_one_unknown() -> None:
    data = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    note = open_note(data, [peter()])
    assert note.sigs == (PETER,)
    assert note.unverified_sigs == (ENOCH,)
    both = open_note(data, [peter(), enoch()])
    assert both.sigs == (PETER, ENOCH)
    assert both.unverified_sigs == ()


def test_no_known_key_is_refused_but_the_note_is_available() -> None:
    data = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    with pytest.raises(UnverifiedNoteError, match="no signature from a known key") as info:
        open_note(data, [])
    note = info.value.note
    assert note.sigs == () and note.unverified_sigs == (PETER, ENOCH)  # type: ignore[attr-defined]


def test_go_verifier_key_manglings_are_refused() -> None:
    # As Go's TestNewVerifier: every proper substring and every one-byte change fails.
    b = PETER_VKEY
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(NoteError):
                    parse_vkey(b[i:j])
    for i in range(len(b)):
        with pytest.raises(NoteError):
            parse_vkey(b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :])
    # Wrong key length and unknown type, each with a matching key hash (from Go's test).
    with pytest.raises(NoteError):
        parse_vkey("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    with pytest.raises(NoteError, match="type 0x65 is not supported"):
        parse_vkey("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


def test_go_signer_key_manglings_are_refused() -> None:
    b = PETER_SKEY
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(NoteError):
                    Signer.from_skey(b[i:j])
    for i in range(len(b)):
        with pytest.raises(NoteError):
            Signer.from_skey(b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :])


def test_transparency_dev_verifier_keys() -> None:
    # From transparency-dev/formats note/note_cosigv1_test.go (TestCoSigV1NewVerifier).
    ed = parse_vkey("TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6")
    assert isinstance(ed, Verifier) and ed.key_hash == 0x7997405C
    cosigner = parse_vkey("remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2")
    assert isinstance(cosigner, CosignatureVerifier)
    assert cosigner.key_hash == 0xDA77ADE7
    assert cosigner.vkey() == "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
    for bad in (
        "bananas.sigstore.dev+12344556",
        "rekor.sigstore.dev+12345678+THIS_IS_NOT_BASE64!",
        "rekor.sigstore.dev+12345678+AwEB",
        "rekor.sigstore.dev+00000000+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6",
        "TEST+7997405C+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6",  # upper-case hash
    ):
        with pytest.raises(NoteError):
            parse_vkey(bad)


def test_transparency_dev_cosignature_timestamp() -> None:
    # TestCosignatureTimestamp in transparency-dev/formats: this signature holds 1727964367.
    b64 = (
        "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOwor"
        "DcFiEBYJXORmnFBOBA=="
    )
    assert cosignature_timestamp(_sig("w", b64)) == 1727964367
    with pytest.raises(NoteError, match="not an Ed25519 cosignature"):
        cosignature_timestamp(PETER)


def test_spec_example_text_may_contain_empty_lines() -> None:
    # The example of c2sp.org/signed-note: the text is split off at the *last* blank line.
    data = (
        "Ognuno sta solo sul cuor della terra\n"
        "trafitto da un raggio di sole:\n"
        "\n"
        "ed \u00e8 subito sera.\n"
        "\n"
        "\u2014 quasimodo.example/salvatore NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+"
        "EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
    ).encode()
    text, sigs = parse_note(data)
    assert text.endswith("\n\ned \u00e8 subito sera.\n")
    assert [s.name for s in sigs] == ["quasimodo.example/salvatore"]
    signer = Signer.generate("example.com/poet")
    assert open_note(sign_note(text, [signer]), [signer.verifier()]).text == text


# -- Go's Open edge cases --------------------------------------------------------------


def test_too_many_signatures() -> None:
    data = (TEXT + "\n" + PETER_SIG * 101).encode()
    for verifiers in ([peter()], []):
        with pytest.raises(NoteError, match="101 signatures; the limit is 100"):
            open_note(data, verifiers)
    # The spec requires accepting at least 16.
    assert open_note((TEXT + "\n" + PETER_SIG * 16).encode(), [peter()]).sigs == (PETER,)


def test_invalid_signature_from_a_known_key_is_an_error() -> None:
    bad = (TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]).encode()
    with pytest.raises(NoteError, match=r"PeterNeumann\+c74f20a3 does not verify"):
        open_note(bad, [peter()])


def test_repeated_signatures_are_recorded_once() -> None:
    enoch_abcd = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    data = (TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_abcd).encode()
    note = open_note(data, [peter()])
    assert note.sigs == (PETER,)
    assert note.unverified_sigs == (ENOCH, _sig("EnochRoot", enoch_abcd.split(" ")[2].strip()))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (TEXT, "no blank line"),
        (TEXT + "\n", "no signature lines"),
        (TEXT + "\n" + PETER_SIG[:-1], "does not end in a newline"),
        ("\x01" + TEXT + "\n" + PETER_SIG, "control character U\\+0001"),
        (TEXT + "\n\u2014 Bad Name " + PETER_B64 + "\n", "not valid base64"),
        (TEXT + "\n" + PETER_SIG + "Unexpected line.\n", "does not start with an em dash"),
        (TEXT + "\n- PeterNeumann " + PETER_B64 + "\n", "does not start with an em dash"),
        (TEXT + "\n\u2014 PeterNeumann\n", "no signature after the key name"),
        (TEXT + "\n\u2014  " + PETER_B64 + "\n", "invalid key name ''"),
        (TEXT + "\n\u2014 Peter+Neumann " + PETER_B64 + "\n", "invalid key name"),
        (TEXT + "\n\u2014 PeterNeumann x08gow==\n", "too short: 4 bytes"),
        (TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG\n", "not valid base64"),
        (TEXT + "\n\u2014 PeterNeumann " + PETER_B64[:-2] + "N=\n", "not canonical base64"),
        (TEXT.replace("\n", "\r\n", 1) + "\n" + PETER_SIG, "control character U\\+000D"),
        (TEXT.replace(" ", "\t", 1) + "\n" + PETER_SIG, "control character U\\+0009"),
        (TEXT + "\n" + PETER_SIG.replace("\n", "\r\n"), "control character U\\+000D"),
    ],
)
def test_malformed_notes_are_refused(data: str, problem: str) -> None:
    with pytest.raises(NoteError, match=problem):
        open_note(data.encode(), [peter()])


def test_non_utf8_is_refused() -> None:
    with pytest.raises(NoteError, match="not valid UTF-8"):
        open_note(b"\xff" + SIGNED, [peter()])
    with pytest.raises(NoteError, match="not valid UTF-8"):
        open_note(SIGNED.replace(b"you", b"\xed\xa0\x80", 1), [peter()])  # a surrogate


def test_too_large_note_is_refused() -> None:
    filler = ("x" * 99 + "\n") * (MAX_NOTE_BYTES // 100)
    data = (filler + TEXT + "\n" + PETER_SIG).encode()
    assert len(data) > MAX_NOTE_BYTES
    with pytest.raises(NoteError, match=f"the limit is {MAX_NOTE_BYTES}"):
        open_note(data, [peter()])


def test_tampered_text_is_refused() -> None:
    with pytest.raises(NoteError, match="does not verify"):
        open_note(SIGNED.replace(b"problem,", b"problem;"), [peter()])


def test_tampered_signature_is_refused() -> None:
    raw = bytearray(base64.b64decode(PETER_B64))
    raw[10] ^= 1
    data = (TEXT + "\n\u2014 PeterNeumann " + base64.b64encode(raw).decode() + "\n").encode()
    with pytest.raises(NoteError, match="does not verify"):
        open_note(data, [peter()])


def test_wrong_key_hash_or_name_is_an_unknown_key() -> None:
    raw = bytearray(base64.b64decode(PETER_B64))
    raw[0] ^= 1
    wrong_hash = f"\u2014 PeterNeumann {base64.b64encode(raw).decode()}\n"
    wrong_name = PETER_SIG.replace("PeterNeumann", "CarmenSandiego")
    for line in (wrong_hash, wrong_name):
        with pytest.raises(UnverifiedNoteError):
            open_note((TEXT + "\n" + line).encode(), [peter()])
        note = open_note((TEXT + "\n" + line + PETER_SIG).encode(), [peter()])
        assert note.sigs == (PETER,) and len(note.unverified_sigs) == 1


def test_ambiguous_verifiers_are_refused() -> None:
    @dataclass(frozen=True)
    class Impostor:
        name: str = "PeterNeumann"
        key_hash: int = 0xC74F20A3

        def verify(self, text: bytes, signature: bytes) -> bool:
            return True

    with pytest.raises(NoteError, match="two different verifiers"):
        open_note(SIGNED, [peter(), Impostor()])
    assert open_note(SIGNED, [peter(), peter()]).sigs == (PETER,)


# -- signing -------------------------------------------------------------------------


def test_sign_refuses_bad_text() -> None:
    signer = Signer.from_skey(PETER_SKEY)
    for text, problem in [
        ("abc", "must end in a newline"),
        ("a\rb\n", "U\\+000D"),
        ("a\x00\n", "U\\+0000"),
        ("\ud800\n", "not encodable as UTF-8"),
    ]:
        with pytest.raises(NoteError, match=problem):
            sign_note(text, [signer])
    with pytest.raises(NoteError, match="at least one signer"):
        sign_note(TEXT, [])


def test_key_names_are_checked() -> None:
    for name in ("", "a b", "a+b", "a\u00a0b", "a\nb"):
        with pytest.raises(NoteError, match="key name"):
            Signer.generate(name)


def test_several_signers_round_trip_and_errors_are_ledger_errors() -> None:
    a, b = Signer.generate("a.example/log"), Signer.generate("b.example/log")
    data = sign_note("hello\n", [a, b])
    note = open_note(data, [b.verifier(), a.verifier()])
    assert [s.name for s in note.sigs] == ["a.example/log", "b.example/log"]
    with pytest.raises(LedgerError):
        open_note(data.replace(b"hello", b"HELLO"), [a.verifier()])


def test_signer_from_project_signing_key() -> None:
    key = SigningKey.generate()
    signer = Signer.from_signing_key("fleetledger.example/hub-1", key)
    assert signer.public_key == key.public.raw
    assert signer.seed() == key.private_raw()
    # Raw Ed25519 over the text, without ledger.signing's "fleetledger/" domain prefix.
    data = sign_note("x\n", [signer])
    sig = parse_note(data)[1][0].signature
    assert key.private.sign(b"x\n") == sig


def test_add_signatures_replaces_the_same_key() -> None:
    a = Signer.generate("a")
    data = sign_note("t\n", [a])
    peter_signer = Signer.from_skey(PETER_SKEY)
    extra = Signature(peter_signer.name, peter_signer.key_hash, peter_signer.sign(b"t\n"))
    twice = add_signatures(add_signatures(data, [extra]), [extra])
    assert [s.name for s in parse_note(twice)[1]] == ["a", "PeterNeumann"]


# -- cosignatures (type 0x04) ------------------------------------------------------------


BODY = b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"


def test_cosignature_message_is_the_spec_example() -> None:
    assert cosignature_message(BODY, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\n"
        b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )
    with pytest.raises(NoteError, match="between 0 and 2\\*\\*63-1"):
        cosignature_message(BODY, 2**63)
    with pytest.raises(NoteError, match="must be an integer"):
        cosignature_message(BODY, True)


def test_cosignature_signs_timestamp_and_body() -> None:
    key = SigningKey.generate()
    signer = CosignatureSigner.from_signing_key("witness.example/w1", key)
    verifier = signer.verifier()
    assert verifier.key_hash == key_hash("witness.example/w1", ALG_COSIGNATURE_V1, key.public.raw)
    assert verifier.key_hash != key_hash("witness.example/w1", ALG_ED25519, key.public.raw)
    assert parse_vkey(signer.vkey()) == verifier
    sig = signer.sign(BODY, 1679315147)
    assert sig[:8] == (1679315147).to_bytes(8, "big") and len(sig) == 72
    assert key.private.public_key().verify(sig[8:], cosignature_message(BODY, 1679315147)) is None
    assert verifier.verify(BODY, sig)
    later = (1679315148).to_bytes(8, "big") + sig[8:]
    assert not verifier.verify(BODY, later)
    assert not verifier.verify(BODY.replace(b"20852163", b"20852164"), sig)
    assert not verifier.verify(BODY, sig[8:])  # a plain note signature is not a cosignature
    huge = (2**63).to_bytes(8, "big") + sig[8:]
    assert not verifier.verify(BODY, huge)


def test_cosignature_key_is_not_a_note_key() -> None:
    key = SigningKey.generate()
    cosigner = CosignatureSigner.from_signing_key("w", key)
    data = add_signatures(
        sign_note("a\nb\nc\n", [Signer.generate("log")]),
        [cosigner.signature("a\nb\nc\n", 5)],
    )
    # A type-0x01 verifier for the same name and public key has another key hash.
    with pytest.raises(UnverifiedNoteError):
        open_note(data, [Verifier("w", key.public.raw)])
    note = open_note(data, [cosigner.verifier()])
    assert cosignature_timestamp(note.sigs[0]) == 5


# -- any input: a parsed note or a NoteError, never another exception ---------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    for candidate in (data, data + b"\n\n" + PETER_SIG.encode(), SIGNED[:40] + data):
        try:
            note = open_note(candidate, [peter()])
        except NoteError:
            continue
        assert note.sigs == (PETER,)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=80))
def test_sign_then_open_round_trips_any_valid_text(body: str) -> None:
    signer = Signer.from_skey(PETER_SKEY)
    text = body + "\n"
    try:
        data = sign_note(text, [signer])
    except NoteError:
        assert any(ord(c) < 0x20 and c != "\n" for c in text)
        return
    assert open_note(data, [peter()]).text == text
