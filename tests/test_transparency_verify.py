"""Model transparency, device side (pure): edge_agent.transparency.verify_release_inclusion
checks a proof bundle against the trust root alone; and the root fields it needs."""

from __future__ import annotations

import time
from pathlib import Path

import blake3
import pytest

from edge_agent import protocol as proto
from edge_agent.bundle import DeviceBundle
from edge_agent.trust.inclusion import (
    InclusionPending,
    InclusionRefused,
    transparency_keys,
    verify_release_inclusion,
)
from edge_agent.trust.root import TrustRoot
from hub.keys.keyring import plan_next_root
from hub.keys.witness_roots import plan_witness_root
from hub.log.transparency import witnessed_enough
from ledger.checkpoint import Checkpoint, cosign, sign_checkpoint
from ledger.encoding import canonical_decode, canonical_encode
from ledger.note import Signer, parse_note
from ledger.signing import SigningKey
from ledger.storage.bundles import make_bundle_at
from ledger.storage.checkpoint_store import StoredCheckpoint
from ledger.storage.store import LedgerStore, NewEvent

pytestmark = pytest.mark.timeout(30)

ORIGIN = "fleetledger/test-hub"
HOUR = 3600 * 10**9


class World:
    """A root with a named log key and witnesses w1..w3 (threshold 2), and a ledger
    holding a release of kws/1."""

    def __init__(self, tmp_path: Path, threshold: int = 2) -> None:
        self.keys = {r: SigningKey.generate() for r in ("root", "release", "director", "log")}
        self.witness_keys = {f"w{i}": SigningKey.generate() for i in (1, 2, 3)}
        names = {self.keys["log"].keyid: ORIGIN}
        names.update({k.keyid: n for n, k in self.witness_keys.items()})
        role_keys = {r: [k] for r, k in self.keys.items()}
        role_keys["witness"] = list(self.witness_keys.values())
        self.root = TrustRoot.from_envelope(TrustRoot.build(
            role_keys, {"witness": threshold}, names=names))
        self.manifest = b"signed manifest bytes"
        self.manifest_hash = blake3.blake3(self.manifest).hexdigest()
        self.store = LedgerStore.open(str(tmp_path / "ledger.db"))
        self.store.append_many([
            NewEvent("operator.added", "hub", "operator:admin", {"name": "admin"}),
            NewEvent("model.released", "op", "model:kws/1", {
                "name": "kws", "version": "1", "digest": "d" * 64,
                "manifest_hash": self.manifest_hash, "manifest": self.manifest,
                "expires": 1}),
            NewEvent("device.enrolled", "op", "device:dev-1", {"device": "dev-1"}),
        ])
        self.seq = 1

    def checkpoint(self, witnesses: list[str], log: SigningKey | None = None) -> StoredCheckpoint:
        size = self.store.count()
        root = self.store.root(size)
        note = sign_checkpoint(Checkpoint(ORIGIN, size, root),
                               Signer.from_signing_key(ORIGIN, log or self.keys["log"]))
        full = note
        for name in witnesses:
            full = cosign(full, self.witness_keys[name], name, int(time.time()))
        _, sigs = parse_note(full)
        return StoredCheckpoint(size, 0, root, note, tuple(s for s in sigs if s.name != ORIGIN))

    def bundle(self, witnesses: list[str], seq: int | None = None) -> bytes:
        return make_bundle_at(self.store, self.seq if seq is None else seq,
                              self.checkpoint(witnesses))

    def assignment(self, manifest_hash: str | None = None, version: str = "1") -> proto.Assignment:
        now = time.time_ns()
        return proto.Assignment(
            device="dev-1", model="kws", version=version, digest="d" * 64,
            manifest_hash=manifest_hash or self.manifest_hash, counter=1, rollout="r",
            issued_at=now, expires=now + HOUR)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_witnessed_release_is_accepted(world: World) -> None:
    report = verify_release_inclusion(world.root, world.bundle(["w1", "w3"]), world.assignment())
    assert report.entry.kind == "model.released" and report.entry.seq == 1
    assert report.witnesses == ["w1", "w3"]


def test_too_few_cosignatures_are_refused(world: World) -> None:
    with pytest.raises(InclusionRefused, match=r"cosigned by 1 .* 2 required"):
        verify_release_inclusion(world.root, world.bundle(["w2"]), world.assignment())
    with pytest.raises(InclusionRefused, match="cosigned by 0"):
        verify_release_inclusion(world.root, world.bundle([]), world.assignment())


def test_the_same_witness_twice_counts_once(world: World) -> None:
    cp = world.checkpoint(["w1"])
    doubled = StoredCheckpoint(cp.size, 0, cp.root, cp.note, cp.cosignatures * 2)
    with pytest.raises(InclusionRefused, match="cosigned by 1"):
        verify_release_inclusion(world.root, make_bundle_at(world.store, 1, doubled),
                                 world.assignment())


def test_a_cosignature_by_a_witness_outside_the_root_does_not_count(world: World) -> None:
    world.witness_keys["w2"] = SigningKey.generate()  # same name, another key
    with pytest.raises(InclusionRefused, match="cosigned by 1"):
        verify_release_inclusion(world.root, world.bundle(["w1", "w2"]), world.assignment())


def _tamper(data: bytes, **changes: object) -> bytes:
    doc = canonical_decode(data)
    assert isinstance(doc, dict)
    doc.update(changes)
    return canonical_encode(doc)


def test_a_tampered_inclusion_proof_is_refused(world: World) -> None:
    good = world.bundle(["w1", "w2"])
    proof = canonical_decode(good)["inclusion_proof"]
    bad = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    with pytest.raises(InclusionRefused, match="inclusion proof"):
        verify_release_inclusion(world.root, _tamper(good, inclusion_proof=bad),
                                 world.assignment())
    with pytest.raises(InclusionRefused, match="inclusion proof"):
        verify_release_inclusion(world.root, _tamper(good, inclusion_proof=proof[:-1]),
                                 world.assignment())


def test_a_checkpoint_not_signed_by_the_root_log_key_is_refused(world: World) -> None:
    cp = world.checkpoint(["w1", "w2"], log=SigningKey.generate())
    with pytest.raises(InclusionRefused, match="checkpoint"):
        verify_release_inclusion(world.root, make_bundle_at(world.store, 1, cp),
                                 world.assignment())


def test_a_manifest_the_ledger_never_released_is_refused(world: World) -> None:
    other = blake3.blake3(b"an attacker's manifest").hexdigest()
    with pytest.raises(InclusionRefused, match="another manifest hash"):
        verify_release_inclusion(world.root, world.bundle(["w1", "w2"]),
                                 world.assignment(manifest_hash=other))
    with pytest.raises(InclusionRefused, match="not kws/2"):
        verify_release_inclusion(world.root, world.bundle(["w1", "w2"]),
                                 world.assignment(version="2"))


def test_a_proof_of_another_entry_kind_is_refused(world: World) -> None:
    with pytest.raises(InclusionRefused, match=r"'device\.enrolled', not a release"):
        verify_release_inclusion(world.root, world.bundle(["w1", "w2"], seq=2),
                                 world.assignment())


def test_garbage_is_refused(world: World) -> None:
    with pytest.raises(InclusionRefused, match="not a proof bundle"):
        verify_release_inclusion(world.root, b"\xc1garbage", world.assignment())


def test_a_root_without_witnesses_means_waiting(world: World) -> None:
    old = TrustRoot.from_envelope(TrustRoot.build({r: [k] for r, k in world.keys.items()}))
    assert old.names == {}  # a root from before model transparency still decodes
    with pytest.raises(InclusionPending, match="names no log key"):
        verify_release_inclusion(old, world.bundle(["w1"]), world.assignment())


def test_witness_add_makes_the_next_root_and_rotation_keeps_names(world: World) -> None:
    held = list(world.keys.values())
    old = TrustRoot.from_envelope(TrustRoot.build({r: [k] for r, k in world.keys.items()}))
    w1 = world.witness_keys["w1"]
    change = plan_witness_root(old, held, "w1", w1.public, ORIGIN)
    root = TrustRoot.from_envelope(change.root)
    assert root.version == 2 and root.roles["witness"].threshold == 1
    assert root.names == {world.keys["log"].keyid: ORIGIN, w1.keyid: "w1"}
    keys = transparency_keys(root)
    assert [v.name for v in keys.logs] == [ORIGIN] and keys.threshold == 1
    # A later rotation of another role keeps the names and the witness role.
    rotated = plan_next_root(root, held, "release", add=SigningKey.generate())
    after = TrustRoot.from_envelope(rotated.root)
    assert after.names == root.names and after.roles["witness"] == root.roles["witness"]
    # The hub publishes only when the root's threshold of witnesses cosigned.
    assert witnessed_enough(root, world.checkpoint(["w1"]))
    assert not witnessed_enough(root, world.checkpoint(["w2", "w3"]))
    assert not witnessed_enough(world.root, world.checkpoint(["w1"]))  # threshold 2


def test_the_device_bundle_can_require_inclusion(tmp_path: Path) -> None:
    (tmp_path / "device.toml").write_text(
        'device_id = "dev-1"\nnats_url = "nats://x:1"\nrequire_inclusion = true\n')
    assert DeviceBundle.load(tmp_path).require_inclusion
    (tmp_path / "device.toml").write_text('device_id = "dev-1"\nnats_url = "nats://x:1"\n')
    assert not DeviceBundle.load(tmp_path).require_inclusion
