"""The device's root of trust (edge_agent/trust.py), pure: every refusal TUF names.

Each refusal is a `TrustError` whose message says what is wrong (which role, how many
valid signatures of how many, expired, which key), so an operator can act on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from edge_agent import protocol as proto
from edge_agent.protocol import SignedEnvelope
from edge_agent.trust.root import TrustError, TrustRoot
from ledger.signing import SigningKey

HOUR = 3600 * 10**9


@dataclass
class Keys:
    root: SigningKey
    release: SigningKey
    director: SigningKey
    log: SigningKey

    def roles(self) -> dict[str, list[SigningKey]]:
        return {"root": [self.root], "release": [self.release],
                "director": [self.director], "log": [self.log]}


@pytest.fixture
def keys() -> Keys:
    return Keys(*(SigningKey.generate() for _ in range(4)))


@pytest.fixture
def root(keys: Keys) -> TrustRoot:
    return TrustRoot.from_envelope(TrustRoot.build(keys.roles()))


def manifest_doc(expires: int | None = None) -> dict[str, Any]:
    now = time.time_ns()
    return proto.ReleaseManifest(
        name="kws", version="1", digest="ab" * 32, size=10, format="tflite", inputs=[],
        outputs=[], created=now, expires=now + HOUR if expires is None else expires,
    ).to_map()


def signed_manifest(*signers: SigningKey, domain: str = proto.DOMAIN_MANIFEST,
                    expires: int | None = None) -> SignedEnvelope:
    return SignedEnvelope.sign(manifest_doc(expires), domain, list(signers))


def refused(root: TrustRoot, env: SignedEnvelope, role: str, domain: str,
            *words: str, now: int | None = None) -> str:
    with pytest.raises(TrustError) as info:
        root.verify(env, role, domain, now=now)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


def root_envelope(doc: dict[str, Any], *signers: SigningKey) -> SignedEnvelope:
    return SignedEnvelope.sign(doc, proto.DOMAIN_ROOT, list(signers))


def root_doc(keys: Keys, **changes: Any) -> dict[str, Any]:
    env = TrustRoot.build(keys.roles())
    doc = env.document("root")
    doc.update(changes)
    return doc


# ---------------------------------------------------------------- building and loading


def test_built_root_lists_every_role_with_its_key_and_threshold(keys: Keys) -> None:
    root = TrustRoot.from_envelope(TrustRoot.build(keys.roles(), version=3))
    assert root.version == 3
    assert set(root.roles) == {"root", "release", "director", "log"}
    assert root.roles["release"].keyids == (keys.release.keyid,)
    assert root.roles["release"].threshold == 1
    assert root.keys[keys.director.keyid] == keys.director.public
    assert root.expires > time.time_ns()


def test_root_round_trips_through_its_encoded_bytes(keys: Keys, tmp_path: Path) -> None:
    env = TrustRoot.build(keys.roles())
    path = tmp_path / "trust-root.bin"
    path.write_bytes(env.encode())
    loaded = TrustRoot.load(path)
    assert loaded == TrustRoot.from_envelope(env)
    assert loaded.envelope == env


def test_loading_a_missing_root_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match=r"cannot read trust root .*nope.bin"):
        TrustRoot.load(tmp_path / "nope.bin")


def test_loading_a_garbage_root_file_is_a_trust_error(tmp_path: Path) -> None:
    path = tmp_path / "trust-root.bin"
    path.write_bytes(b"\xc1 not a root")
    with pytest.raises(TrustError, match="trust root: malformed msgpack"):
        TrustRoot.load(path)


# ---------------------------------------------------------------- accepted


def test_document_signed_by_its_role_key_is_accepted(root: TrustRoot, keys: Keys) -> None:
    env = signed_manifest(keys.release)
    doc = root.verify(env, "release", proto.DOMAIN_MANIFEST)
    assert proto.ReleaseManifest.from_map(doc).name == "kws"


def test_assignment_signed_by_the_director_key_is_accepted(root: TrustRoot, keys: Keys) -> None:
    now = time.time_ns()
    doc = proto.Assignment(
        device="dev-1", model="kws", version="1", digest="ab" * 32, manifest_hash="cd" * 32,
        counter=1, rollout="r", issued_at=now, expires=now + HOUR,
    ).to_map()
    env = SignedEnvelope.sign(doc, proto.DOMAIN_ASSIGNMENT, [keys.director])
    assert root.verify(env, "director", proto.DOMAIN_ASSIGNMENT) == doc


def test_extra_signatures_from_unknown_keys_do_not_hurt(root: TrustRoot, keys: Keys) -> None:
    env = signed_manifest(SigningKey.generate(), keys.release, keys.director)
    assert root.verify(env, "release", proto.DOMAIN_MANIFEST)["version"] == "1"


# ---------------------------------------------------------------- refused documents


def test_signature_by_a_key_outside_the_root_is_refused(root: TrustRoot) -> None:
    rogue = SigningKey.generate()
    refused(root, signed_manifest(rogue), "release", proto.DOMAIN_MANIFEST,
            "0 valid signature(s)", "release role", "1 required", rogue.keyid)


def test_unsigned_document_is_refused(root: TrustRoot) -> None:
    env = SignedEnvelope(signed_manifest().signed, ())
    refused(root, env, "release", proto.DOMAIN_MANIFEST, "0 valid", "signed by: none")


@pytest.mark.parametrize("signer", ["director", "root", "log"])
def test_key_of_another_role_cannot_sign_a_manifest(
    root: TrustRoot, keys: Keys, signer: str
) -> None:
    key = getattr(keys, signer)
    refused(root, signed_manifest(key), "release", proto.DOMAIN_MANIFEST,
            "0 valid signature(s) from the release role", key.keyid)


def test_release_key_cannot_sign_an_assignment(root: TrustRoot, keys: Keys) -> None:
    env = signed_manifest(keys.release, domain=proto.DOMAIN_ASSIGNMENT)
    refused(root, env, "director", proto.DOMAIN_ASSIGNMENT, "director role", "0 valid")


def test_signature_for_another_domain_is_refused(root: TrustRoot, keys: Keys) -> None:
    # The release key signed these bytes as an *assignment*; replayed as a manifest it
    # must not count, although key, role and bytes are all right.
    env = signed_manifest(keys.release, domain=proto.DOMAIN_ASSIGNMENT)
    refused(root, env, "release", proto.DOMAIN_MANIFEST, "release-manifest", "0 valid")
    same_bytes = SignedEnvelope(env.signed, (proto.Signature(
        keys.release.keyid, keys.release.sign(proto.DOMAIN_MANIFEST, env.signed)),))
    assert root.verify(same_bytes, "release", proto.DOMAIN_MANIFEST)


def test_root_signature_cannot_be_replayed_as_a_manifest(keys: Keys) -> None:
    # One key in two roles: its root-domain signature must not count for a manifest.
    roles = keys.roles() | {"release": [keys.root]}
    root = TrustRoot.from_envelope(TrustRoot.build(roles))
    env = signed_manifest(keys.root, domain=proto.DOMAIN_ROOT)
    refused(root, env, "release", proto.DOMAIN_MANIFEST, "0 valid")
    assert root.verify(signed_manifest(keys.root), "release", proto.DOMAIN_MANIFEST)


def test_below_threshold_is_refused_and_at_threshold_accepted(keys: Keys) -> None:
    second = SigningKey.generate()
    roles = keys.roles() | {"release": [keys.release, second]}
    root = TrustRoot.from_envelope(TrustRoot.build(roles, thresholds={"release": 2}))
    assert root.roles["release"].threshold == 2
    refused(root, signed_manifest(keys.release), "release", proto.DOMAIN_MANIFEST,
            "1 valid signature(s)", "2 required")
    refused(root, signed_manifest(second), "release", proto.DOMAIN_MANIFEST, "1 valid")
    assert root.verify(signed_manifest(keys.release, second), "release", proto.DOMAIN_MANIFEST)


def test_duplicate_signatures_from_one_key_count_once(keys: Keys) -> None:
    second = SigningKey.generate()
    roles = keys.roles() | {"release": [keys.release, second]}
    root = TrustRoot.from_envelope(TrustRoot.build(roles, thresholds={"release": 2}))
    env = signed_manifest(keys.release)
    doubled = replace(env, signatures=env.signatures * 3)
    refused(root, doubled, "release", proto.DOMAIN_MANIFEST, "1 valid signature(s)",
            "2 required")


def test_role_listing_one_key_twice_still_needs_two_keys(keys: Keys) -> None:
    roles = keys.roles() | {"release": [keys.release, keys.release]}
    root = TrustRoot.from_envelope(TrustRoot.build(roles, thresholds={"release": 2}))
    refused(root, signed_manifest(keys.release, keys.release), "release",
            proto.DOMAIN_MANIFEST, "1 valid", "2 required")


def test_expired_document_is_refused(root: TrustRoot, keys: Keys) -> None:
    env = signed_manifest(keys.release, expires=time.time_ns() - 1)
    refused(root, env, "release", proto.DOMAIN_MANIFEST, "release-manifest expired",
            "re-sign")


def test_expiry_is_judged_at_the_given_time(root: TrustRoot, keys: Keys) -> None:
    expires = time.time_ns() + HOUR
    env = signed_manifest(keys.release, expires=expires)
    assert root.verify(env, "release", proto.DOMAIN_MANIFEST, now=expires)
    refused(root, env, "release", proto.DOMAIN_MANIFEST, "expired", now=expires + 1)


def test_tampered_signed_byte_is_refused(root: TrustRoot, keys: Keys) -> None:
    env = signed_manifest(keys.release)
    assert root.verify(env, "release", proto.DOMAIN_MANIFEST)
    for index in (0, len(env.signed) // 2, len(env.signed) - 1):
        tampered = bytearray(env.signed)
        tampered[index] ^= 0x01
        refused(root, replace(env, signed=bytes(tampered)), "release",
                proto.DOMAIN_MANIFEST, "0 valid signature(s)", "1 required")


def test_tampered_signature_is_refused(root: TrustRoot, keys: Keys) -> None:
    env = signed_manifest(keys.release)
    sig = bytearray(env.signatures[0].sig)
    sig[0] ^= 0x80
    bad = replace(env, signatures=(replace(env.signatures[0], sig=bytes(sig)),))
    refused(root, bad, "release", proto.DOMAIN_MANIFEST, "0 valid")


def test_unknown_role_is_refused(root: TrustRoot, keys: Keys) -> None:
    refused(root, signed_manifest(keys.release), "witness", proto.DOMAIN_MANIFEST,
            "no role 'witness'")


# ---------------------------------------------------------------- refused roots


def test_expired_root_is_refused(keys: Keys) -> None:
    env = TrustRoot.build(keys.roles(), expires=time.time_ns() - 1)
    with pytest.raises(TrustError, match="expired"):
        TrustRoot.from_envelope(env)


def test_root_expiry_is_judged_at_the_given_time(keys: Keys) -> None:
    expires = time.time_ns() + HOUR
    env = TrustRoot.build(keys.roles(), expires=expires)
    assert TrustRoot.from_envelope(env, now=expires).expires == expires
    with pytest.raises(TrustError, match="expired"):
        TrustRoot.from_envelope(env, now=expires + 1)


def test_root_whose_key_id_does_not_match_its_public_key_is_refused(keys: Keys) -> None:
    doc = root_doc(keys)
    impostor = SigningKey.generate()
    # The release key id now maps to another public key.
    doc["keys"][keys.release.keyid]["public"] = impostor.public.raw
    with pytest.raises(TrustError, match=f"key {keys.release.keyid} does not match"):
        TrustRoot.from_envelope(root_envelope(doc, keys.root))


@pytest.mark.parametrize("public", [b"\x01" * 31, "not bytes", b""])
def test_root_with_a_malformed_public_key_is_refused(keys: Keys, public: Any) -> None:
    doc = root_doc(keys)
    doc["keys"][keys.log.keyid]["public"] = public
    with pytest.raises(TrustError, match="does not match its public key"):
        TrustRoot.from_envelope(root_envelope(doc, keys.root))


def test_root_not_signed_by_its_root_key_is_refused(keys: Keys) -> None:
    env = root_envelope(root_doc(keys), keys.release)
    with pytest.raises(TrustError, match=r"0 valid signature.*root role"):
        TrustRoot.from_envelope(env)


def test_root_signed_for_another_domain_is_refused(keys: Keys) -> None:
    env = SignedEnvelope.sign(root_doc(keys), proto.DOMAIN_MANIFEST, [keys.root])
    with pytest.raises(TrustError, match="0 valid signature"):
        TrustRoot.from_envelope(env)


def test_tampered_root_is_refused(keys: Keys) -> None:
    env = TrustRoot.build(keys.roles())
    doc = env.document("root")
    doc["roles"]["release"]["keyids"] = [SigningKey.generate().keyid]
    forged = SignedEnvelope(SignedEnvelope.sign(doc, "x", []).signed, env.signatures)
    with pytest.raises(TrustError, match="0 valid signature"):
        TrustRoot.from_envelope(forged)


def test_root_with_threshold_zero_is_refused(keys: Keys) -> None:
    doc = root_doc(keys)
    doc["roles"]["release"]["threshold"] = 0
    with pytest.raises(TrustError, match="role release has threshold below 1"):
        TrustRoot.from_envelope(root_envelope(doc, keys.root))


@pytest.mark.parametrize(
    ("path", "value"),
    [(("roles", "release", "threshold"), True), (("roles", "release", "keyids"), "k"),
     (("keys",), []), (("expires",), "never"), (("version",), 1.0),
     (("roles", "release"), None)],
    ids=["threshold-bool", "keyids-text", "keys-list", "expires-text", "version-float",
         "role-none"],
)
def test_malformed_root_is_refused(keys: Keys, path: tuple[str, ...], value: Any) -> None:
    doc = root_doc(keys)
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(TrustError, match="malformed"):
        TrustRoot.from_envelope(root_envelope(doc, keys.root))


def test_document_that_is_not_a_root_is_refused(keys: Keys) -> None:
    env = root_envelope(manifest_doc(), keys.root)
    with pytest.raises(TrustError, match="expected type 'root'"):
        TrustRoot.from_envelope(env)


def test_root_threshold_two_needs_two_root_signatures(keys: Keys) -> None:
    second = SigningKey.generate()
    roles = keys.roles() | {"root": [keys.root, second]}
    env = TrustRoot.build(roles, thresholds={"root": 2})
    assert len(TrustRoot.from_envelope(env).roles["root"].keyids) == 2
    one = replace(env, signatures=env.signatures[:1])
    with pytest.raises(TrustError, match=r"1 valid signature.*2 required"):
        TrustRoot.from_envelope(one)
