"""Trust-root rotation (edge_agent/trust/chain.py), pure: walking a chain of roots."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from edge_agent import protocol as proto
from edge_agent.trust.chain import (
    RootRotationError,
    peek_version,
    root_document,
    sign_root,
    verify_next_root,
    walk_chain,
)
from edge_agent.trust.root import TrustError, TrustRoot
from ledger.signing import SigningKey

HOUR = 3600 * 10**9
ROLES = ("root", "release", "director", "log")


@dataclass
class Repo:
    """An in-memory root history: role keys per version, and the signed roots."""

    keys: dict[str, list[SigningKey]] = field(
        default_factory=lambda: {r: [SigningKey.generate()] for r in ROLES})
    thresholds: dict[str, int] = field(default_factory=dict)
    roots: dict[int, bytes] = field(default_factory=dict)

    def make(self, version: int, signers: list[SigningKey] | None = None,
             expires: int | None = None) -> bytes:
        doc = root_document({r: [k.public for k in ks] for r, ks in self.keys.items()},
                            self.thresholds, version,
                            expires if expires is not None else time.time_ns() + HOUR)
        data = sign_root(doc, signers if signers is not None else self.keys["root"]).encode()
        self.roots[version] = data
        return data

    def rotate(self, role: str, signers_old: bool = True, signers_new: bool = True,
               version: int | None = None, expires: int | None = None) -> bytes:
        old_root = list(self.keys["root"])
        self.keys[role] = [SigningKey.generate()]
        signers = (old_root if signers_old else []) + (self.keys["root"] if signers_new else [])
        return self.make(version or max(self.roots) + 1, signers, expires)

    def trusted(self, version: int = 1) -> TrustRoot:
        return TrustRoot.from_envelope(proto.SignedEnvelope.decode(self.roots[version]),
                                       allow_expired=True)


@pytest.fixture
def repo() -> Repo:
    r = Repo()
    r.make(1)
    return r


def test_director_rotation_is_accepted_and_trusts_the_new_key(repo: Repo) -> None:
    old_director = repo.keys["director"][0]
    repo.rotate("director")
    root = walk_chain(repo.trusted(1), repo.roots)
    assert root.version == 2
    assert root.roles["director"].keyids == (repo.keys["director"][0].keyid,)
    assert old_director.keyid not in root.roles["director"].keyids


def test_root_key_rotation_needs_old_and_new_root_keys(repo: Repo) -> None:
    repo.rotate("root")
    assert walk_chain(repo.trusted(1), repo.roots).version == 2


def test_root_rotation_signed_by_the_old_keys_only_is_refused(repo: Repo) -> None:
    repo.rotate("root", signers_new=False)
    with pytest.raises(TrustError, match="root rotation signed by the old keys only"):
        verify_next_root(repo.trusted(1), repo.roots[2])


def test_root_rotation_signed_by_the_new_keys_only_is_refused(repo: Repo) -> None:
    repo.rotate("root", signers_old=False)
    with pytest.raises(TrustError, match="root rotation signed by the new keys only"):
        verify_next_root(repo.trusted(1), repo.roots[2])


def test_root_signed_by_a_rogue_key_only_is_refused(repo: Repo) -> None:
    repo.make(2, signers=[SigningKey.generate()])
    with pytest.raises(TrustError, match="neither the old nor its own"):
        verify_next_root(repo.trusted(1), repo.roots[2])


@pytest.mark.parametrize("version", [3, 10])
def test_a_version_that_skips_is_refused(repo: Repo, version: int) -> None:
    data = repo.rotate("director", version=version)
    with pytest.raises(TrustError, match="increase by exactly 1"):
        verify_next_root(repo.trusted(1), data)


def test_rollback_to_an_older_or_the_same_version_is_refused(repo: Repo) -> None:
    repo.rotate("director")
    repo.rotate("release")
    trusted = walk_chain(repo.trusted(1), repo.roots)
    assert trusted.version == 3
    for old in (1, 2, 3):
        with pytest.raises(TrustError, match="rollback"):
            verify_next_root(trusted, repo.roots[old])


def test_walk_goes_through_many_rotations_including_the_root_key(repo: Repo) -> None:
    for role in ("director", "root", "release", "root", "director"):
        repo.rotate(role)
    root = walk_chain(repo.trusted(1), repo.roots)
    assert root.version == 6
    assert root.roles["root"].keyids == (repo.keys["root"][0].keyid,)


def test_expired_intermediate_roots_are_fine_but_the_last_must_be_valid(repo: Repo) -> None:
    past = time.time_ns() - HOUR
    repo.rotate("director", expires=past)
    repo.rotate("director")
    assert walk_chain(repo.trusted(1), repo.roots).version == 3


def test_an_expired_final_root_is_refused_and_progress_is_kept(repo: Repo) -> None:
    repo.rotate("director")
    repo.rotate("director", expires=time.time_ns() - HOUR)
    with pytest.raises(RootRotationError, match="has expired") as info:
        walk_chain(repo.trusted(1), repo.roots)
    assert info.value.accepted.version == 2


def test_a_bad_step_stops_the_walk_and_keeps_the_good_prefix(repo: Repo) -> None:
    repo.rotate("director")
    repo.rotate("root", signers_new=False)  # root 3: old keys only
    repo.rotate("director")  # root 4 would chain from 3
    with pytest.raises(RootRotationError, match="old keys only") as info:
        walk_chain(repo.trusted(1), repo.roots)
    assert info.value.accepted.version == 2


def test_tampered_root_in_the_chain_is_refused(repo: Repo) -> None:
    data = bytearray(repo.rotate("director"))
    data[-5] ^= 1
    with pytest.raises(TrustError):
        walk_chain(repo.trusted(1), {2: bytes(data)})


def test_threshold_two_root_needs_two_old_signatures(repo: Repo) -> None:
    repo.keys["root"] = [SigningKey.generate(), SigningKey.generate()]
    repo.thresholds["root"] = 2
    repo.make(1)
    two = list(repo.keys["root"])
    repo.keys["director"] = [SigningKey.generate()]
    repo.make(2, signers=[two[0]])  # one of two: below both thresholds
    with pytest.raises(TrustError, match="1 valid signature"):
        verify_next_root(repo.trusted(1), repo.roots[2])
    repo.make(2, signers=two)
    assert verify_next_root(repo.trusted(1), repo.roots[2]).version == 2


def test_nothing_newer_leaves_the_trusted_root(repo: Repo) -> None:
    trusted = repo.trusted(1)
    assert walk_chain(trusted, {}) is trusted


def test_peek_version_reads_the_claim_without_trusting_it(repo: Repo) -> None:
    assert peek_version(repo.rotate("director")) == 2
    with pytest.raises(TrustError):
        peek_version(b"\xc1")
