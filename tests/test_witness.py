"""The checkpoint witness (ledger/witness.py): cosigns a consistent chain of checkpoints
over real RFC 9162 Merkle trees (ledger/merkle.py's reference functions), refuses forks
with both notes as evidence, ignores old checkpoints that are prefixes, and keeps its
state across restarts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from ledger import merkle
from ledger.checkpoint import (
    Checkpoint,
    open_checkpoint,
    sign_checkpoint,
    tree_hash_extensions,
)
from ledger.errors import StaleCheckpoint, WitnessError, WitnessStateError
from ledger.merkle import TreeHash
from ledger.note import Signer, parse_note, sign_note
from ledger.signing import SigningKey
from ledger.witness import STATE_FORMAT, Witness, WitnessState

ORIGIN = "fleetledger.example/hub-1"
WITNESS = "witness.example/w1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


class Log:
    """A log over real leaves: checkpoints and consistency proofs by the reference code."""

    def __init__(self, th: TreeHash, signer: Signer, prefix: bytes = b"entry") -> None:
        self.th = th
        self.signer = signer
        self.leaves = [th.leaf(prefix + b" %d" % i) for i in range(40)]

    def checkpoint(self, size: int) -> bytes:
        root = merkle.root_from_leaves(self.th, self.leaves[:size])
        extensions = tree_hash_extensions(self.th.name)  # the tree hash is signed
        return sign_checkpoint(Checkpoint(self.signer.name, size, root, extensions),
                               self.signer)

    def proof(self, old: int, new: int) -> list[bytes]:
        return merkle.reference_consistency_proof(self.th, old, self.leaves[:new])


@pytest.fixture(params=[merkle.BLAKE3, merkle.SHA256], ids=lambda th: th.name)
def th(request: pytest.FixtureRequest) -> TreeHash:
    result: TreeHash = request.param
    return result


@pytest.fixture
def log_signer() -> Signer:
    return Signer.generate(ORIGIN)


@pytest.fixture
def log(th: TreeHash, log_signer: Signer) -> Log:
    return Log(th, log_signer)


@pytest.fixture
def witness_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "witness" / "state.json"


def make_witness(
    path: Path,
    key: SigningKey,
    log_signer: Signer,
    clock: Clock | None = None,
    name: str = WITNESS,
) -> Witness:
    logs = {ORIGIN: log_signer.verifier()}
    return Witness(name, key, logs, WitnessState(path), clock or Clock())


@pytest.fixture
def witness(state_path: Path, witness_key: SigningKey, log_signer: Signer) -> Witness:
    return make_witness(state_path, witness_key, log_signer)


def feed(witness: Witness, log: Log, sizes: Sequence[int]) -> bytes:
    """Offer checkpoints of `sizes` in order, each with the proof from the last one."""
    cosigned = b""
    for size in sizes:
        latest = witness.latest(ORIGIN)
        old = 0 if latest is None else latest.size
        proof = [] if latest is None else log.proof(old, size)
        cosigned = witness.consider(log.checkpoint(size), proof, log.th)
    return cosigned


def test_accepts_a_consistent_chain(witness: Witness, log: Log, log_signer: Signer) -> None:
    for size in (1, 2, 3, 4, 7, 8, 9, 16, 17, 31, 32, 33, 40, 40):
        cosigned = feed(witness, log, [size])
        opened = open_checkpoint(cosigned, log_signer.verifier(), [witness.verifier])
        assert opened.checkpoint.size == size
        assert opened.checkpoint.root == merkle.root_from_leaves(log.th, log.leaves[:size])
        assert [c.name for c in opened.cosignatures] == [WITNESS]
    latest = witness.latest(ORIGIN)
    assert latest is not None and latest.size == 40


def test_first_checkpoint_may_be_the_empty_tree(witness: Witness, log: Log) -> None:
    feed(witness, log, [0])
    latest = witness.latest(ORIGIN)
    assert latest is not None and latest.size == 0 and latest.root == log.th.empty()
    feed(witness, log, [5])  # from size 0: the empty proof


def test_cosignature_timestamps_come_from_the_clock(
    state_path: Path, witness_key: SigningKey, log_signer: Signer, log: Log
) -> None:
    clock = Clock()
    witness = make_witness(state_path, witness_key, log_signer, clock)
    cosigned = feed(witness, log, [3])
    opened = open_checkpoint(cosigned, log_signer.verifier(), [witness.verifier])
    assert opened.cosignatures[0].timestamp == clock.now


def test_other_cosignatures_are_kept(witness: Witness, log: Log, tmp_path: Path) -> None:
    other_key = SigningKey.generate()
    path = tmp_path / "other.json"
    other = make_witness(path, other_key, log.signer, name="witness.example/w2")
    note = other.consider(log.checkpoint(3), [], log.th)
    cosigned = witness.consider(note, [], log.th)
    names = [s.name for s in parse_note(cosigned)[1]]
    assert names == [ORIGIN, "witness.example/w2", WITNESS]
    opened = open_checkpoint(cosigned, log.signer.verifier(), [witness.verifier, other.verifier])
    assert len(opened.cosignatures) == 2


def test_refuses_a_fork_at_the_same_size(
    witness: Witness, log: Log, capsys: pytest.CaptureFixture[str]
) -> None:
    accepted = feed(witness, log, [5, 9])
    forked = Log(log.th, log.signer, prefix=b"other")
    with pytest.raises(
        WitnessError, match=f"FORK of {ORIGIN}: two checkpoints of tree size 9"
    ) as info:
        witness.consider(forked.checkpoint(9), [], log.th)
    assert info.value.evidence == (accepted, forked.checkpoint(9))
    print(info.value)
    printed = capsys.readouterr().out
    assert accepted.decode() in printed and forked.checkpoint(9).decode() in printed
    assert witness.latest(ORIGIN) == Checkpoint.parse(parse_note(accepted)[0])


def test_refuses_a_larger_tree_inconsistent_with_the_old_one(witness: Witness, log: Log) -> None:
    accepted = feed(witness, log, [6])
    forked = Log(log.th, log.signer, prefix=b"other")
    # A correct proof within the other tree, but it does not start from our tree of size 6.
    with pytest.raises(
        WitnessError, match=r"FORK of .*: the tree of size 12 is not consistent"
    ) as info:
        witness.consider(forked.checkpoint(12), forked.proof(6, 12), log.th)
    assert info.value.evidence == (accepted, forked.checkpoint(12))
    assert accepted.decode() in str(info.value)
    latest = witness.latest(ORIGIN)
    assert latest is not None and latest.size == 6


def test_refuses_bad_proofs(witness: Witness, log: Log) -> None:
    feed(witness, log, [5])
    proof = log.proof(5, 11)
    for bad in (
        [],
        proof[:-1],
        [*proof, proof[0]],
        [bytes(len(proof[0])), *proof[1:]],
        [p[:-1] for p in proof],
    ):
        with pytest.raises(WitnessError, match="not consistent"):
            witness.consider(log.checkpoint(11), bad, log.th)
    with pytest.raises(WitnessError, match="must be empty"):
        witness.consider(log.checkpoint(5), proof, log.th)  # same size: no proof
    feed(witness, log, [11])


def test_an_old_consistent_checkpoint_is_ignored_not_an_alarm(witness: Witness, log: Log) -> None:
    accepted = feed(witness, log, [3, 10])
    for old in (0, 3, 4, 9):  # replayed or redelivered: a prefix of what was cosigned
        with pytest.raises(StaleCheckpoint, match=f"size {old} is a prefix of size 10") as info:
            witness.consider(log.checkpoint(old), log.proof(old, 10), log.th)
        assert info.value.evidence is None
    assert witness.latest(ORIGIN) == Checkpoint.parse(parse_note(accepted)[0])


def test_an_old_checkpoint_of_another_history_is_a_fork(
    witness: Witness, log: Log, log_signer: Signer
) -> None:
    accepted = feed(witness, log, [3, 10])
    other = Log(log.th, log_signer, prefix=b"rewritten")
    with pytest.raises(WitnessError, match=r"FORK .* size 4 is not a prefix") as info:
        witness.consider(other.checkpoint(4), log.proof(4, 10), log.th)
    assert info.value.evidence == (accepted, other.checkpoint(4))
    assert not isinstance(info.value, StaleCheckpoint)
    with pytest.raises(WitnessError, match="FORK") as bad_proof:  # no proof: no prefix
        witness.consider(log.checkpoint(4), [], log.th)
    assert bad_proof.value.evidence is not None


def test_the_tree_hash_is_pinned_by_the_signed_checkpoint(witness: Witness, log: Log) -> None:
    other = merkle.SHA256 if log.th is merkle.BLAKE3 else merkle.BLAKE3
    with pytest.raises(WitnessError, match=f"tree hash mismatch: {other.name} is claimed"):
        witness.consider(log.checkpoint(3), [], other)
    assert witness.latest(ORIGIN) is None


def test_refuses_what_the_log_did_not_sign(witness: Witness, log: Log) -> None:
    impostor = Log(log.th, Signer.generate(ORIGIN))
    with pytest.raises(WitnessError, match="no signature from a known key"):
        witness.consider(impostor.checkpoint(3), [], log.th)
    tampered = log.checkpoint(3).replace(b"\n3\n", b"\n2\n")
    with pytest.raises(WitnessError, match="does not verify"):
        witness.consider(tampered, [], log.th)
    with pytest.raises(WitnessError, match="not a checkpoint note"):
        witness.consider(sign_note("hello\n", [log.signer]), [], log.th)
    with pytest.raises(WitnessError, match="not a checkpoint note"):
        witness.consider(b"garbage", [], log.th)
    other = Signer.generate("other.example/log")
    with pytest.raises(WitnessError, match=r"unknown log 'other\.example/log'"):
        witness.consider(Log(log.th, other).checkpoint(1), [], log.th)
    assert witness.latest(ORIGIN) is None


def test_first_checkpoint_needs_an_empty_proof(witness: Witness, log: Log) -> None:
    with pytest.raises(WitnessError, match=r"no earlier checkpoint .* must be empty"):
        witness.consider(log.checkpoint(4), log.proof(2, 4), log.th)


def test_errors_without_evidence_print_just_the_message(witness: Witness, log: Log) -> None:
    with pytest.raises(WitnessError) as info:
        witness.consider(b"garbage", [], log.th)
    assert info.value.evidence is None and "---" not in str(info.value)


# -- state ------------------------------------------------------------------------------


def test_survives_restart(
    state_path: Path, witness_key: SigningKey, log_signer: Signer, log: Log
) -> None:
    accepted = feed(make_witness(state_path, witness_key, log_signer), log, [4, 9])
    restarted = make_witness(state_path, witness_key, log_signer)
    latest = restarted.latest(ORIGIN)
    assert latest is not None and latest.size == 9
    with pytest.raises(StaleCheckpoint):
        restarted.consider(log.checkpoint(5), log.proof(5, 9), log.th)
    with pytest.raises(WitnessError, match="FORK") as info:  # no proof of a prefix
        restarted.consider(log.checkpoint(5), [], log.th)
    assert info.value.evidence == (accepted, log.checkpoint(5))
    forked = Log(log.th, log.signer, prefix=b"other")
    with pytest.raises(WitnessError, match="FORK"):
        restarted.consider(forked.checkpoint(9), [], log.th)
    feed(restarted, log, [12])


def test_state_file_is_written_atomically(witness: Witness, log: Log, state_path: Path) -> None:
    cosigned = feed(witness, log, [3])
    doc = json.loads(state_path.read_text(encoding="utf-8"))
    assert doc == {"format": STATE_FORMAT, "checkpoints": {ORIGIN: cosigned.decode()}}
    assert sorted(p.name for p in state_path.parent.iterdir()) == ["state.json"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (b"[]", "not a fleetledger-witness-state/1 document"),
        (b'{"format": "other", "checkpoints": {}}', "not a fleetledger-witness-state/1"),
        (b'{"format": "fleetledger-witness-state/1", "checkpoints": {"a": 1}}', "not text"),
        (b'{"format": "fleetledger-witness-state/1", "checkpoints": {"a": "x"}}', "corrupt"),
    ],
)
def test_corrupt_state_is_refused(state_path: Path, content: bytes, problem: str) -> None:
    state_path.parent.mkdir(parents=True)
    state_path.write_bytes(content)
    with pytest.raises(WitnessStateError, match=problem):
        WitnessState(state_path)


def test_state_entry_under_the_wrong_origin_is_refused(
    witness: Witness, log: Log, state_path: Path
) -> None:
    feed(witness, log, [3])
    doc = json.loads(state_path.read_text(encoding="utf-8"))
    doc["checkpoints"] = {"other.example/log": doc["checkpoints"][ORIGIN]}
    state_path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(WitnessStateError, match=r"filed under 'other\.example/log'"):
        WitnessState(state_path)


def test_unwritable_state_is_an_error_and_nothing_is_cosigned(
    tmp_path: Path, witness_key: SigningKey, log_signer: Signer, log: Log
) -> None:
    directory = tmp_path / "state-dir"
    witness = make_witness(directory / "state.json", witness_key, log_signer)
    directory.write_text("now a file, so the state cannot be written")
    with pytest.raises(WitnessStateError, match="cannot write witness state"):
        witness.consider(log.checkpoint(3), [], log.th)
    assert witness.latest(ORIGIN) is None
