"""Model lifecycle commands: register, validate, approve, reject, release, deprecate,
revoke (the rules are in hub.governance.rules; the state in hub.governance.state).

`model.register` and `model.validate` are slow writes: their slow part (taking the
operator's staged upload, hub.uploads; running the model) runs without the write lock,
and the commit re-checks the state under it (hub.commands.router).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
from sqlalchemy import Connection, Engine

from edge_agent import protocol as proto
from edge_agent.runtime import ModelRuntimeError, preflight
from hub import events as ev
from hub.commands import jobs
from hub.commands.envelope import VerifiedCommand
from hub.commands.jobs import JobRefused, Jobs
from hub.commands.outcome import (
    DAY_NS,
    Body,
    CommandError,
    Effects,
    Handler,
    Outcome,
    SlowWork,
    Verbs,
    command_event,
)
from hub.governance import rules as lc
from hub.governance import signatures
from hub.governance import state as governance
from hub.governance.manifests import (
    check_manifest_size,
    drift_tensors,
    manifest_quantization,
)
from hub.governance.results import Bounded, bound_payload, payload_too_big, read_detail
from hub.governance.state import require_release, require_transition
from hub.home.config import HubConfig
from hub.keys.keyring import Keyring
from ledger.encoding import canonical_encode

MAX_DATASET_BYTES = 64 * 1024 * 1024


def model_ref(body: dict[str, Any]) -> tuple[str, str]:
    """(name, version) of a command that names a model version (checked like a device
    checks it)."""
    fields = Body(body)
    name, version = fields.text("name"), fields.text("version")
    proto.check_model_ref(name, version)  # ProtocolError: refused by the router
    return name, version


class ModelCommands:
    def __init__(self, config: HubConfig, keyring: Keyring, effects: Effects,
                 engine: Engine, jobs: Jobs | None = None) -> None:
        self.config = config
        self.jobs = jobs  # validation jobs: status and cancel (the router starts them)
        self.engine = engine  # for reads (policy.show)
        self.keyring = keyring
        self.effects = effects

    def handlers(self) -> Verbs:
        return Verbs(
            writes={
                "model.approve": self.approve,
                "model.reject": self.reject,
                "model.release": self.release,
                "model.deprecate": self.deprecate,
                "model.revoke": self.revoke,
                "model.validation.cancel": self.validation_cancel,
            },
            # Their slow part runs outside the write lock (see outcome.SlowWork).
            slow_writes={"model.register": self.register, "model.validate": self.validate},
            reads={"policy.show": self.policy_show, "model.validation": self.validation_status},
            jobs=frozenset({"model.validate"}),  # answered with a job id (commands.jobs)
        )

    def _job(self, cmd: VerifiedCommand) -> tuple[Jobs, str]:
        job = cmd.body.get("job")
        if not isinstance(job, str) or not job:
            raise CommandError("invalid 'job': expected a job id (from hub model validate)")
        if self.jobs is None:
            raise CommandError("this hub runs validation without jobs")
        return self.jobs, job

    def validation_status(self, cmd: VerifiedCommand) -> Any:
        """A validation job's state, progress and elapsed time; its result once done."""
        jobs, job = self._job(cmd)
        try:
            return jobs.status(job)
        except JobRefused as exc:
            raise CommandError(str(exc)) from None

    def validation_cancel(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        """Ask a running validation to stop at its next step; it records nothing."""
        jobs, job = self._job(cmd)
        try:
            return Outcome([], jobs.cancel(job))
        except JobRefused as exc:
            raise CommandError(str(exc)) from None

    def policy_show(self, cmd: VerifiedCommand) -> Any:
        """The effective policy: of a model name (or `[default]` alone) from the policy
        file as it is now, or, for NAME/VERSION, the one its last validation recorded."""
        from hub import validation  # numpy-heavy; only when asked

        body = cmd.body
        name, version = body.get("name") or "", body.get("version") or ""
        if not isinstance(name, str) or not isinstance(version, str):
            raise CommandError("invalid 'name' or 'version': expected text")
        if version:
            proto.check_model_ref(name, version)
            with self.engine.connect() as conn:
                row = require_release(conn, name, version)
            recorded = row["validation"].get("policy")
            if not isinstance(recorded, dict):
                raise CommandError(
                    f"{name}/{version} has no recorded policy: "
                    + ("it was never validated" if not row["validation"] else
                       f"it was validated before policies were recorded (file {recorded!r})"))
            return {"source": f"model.validated of {name}/{version}", **policy_record(recorded)}
        try:
            policy = validation.load_policy(self.config.policy_path, name).to_payload()
        except validation.ValidationError as exc:
            raise CommandError(f"policy {self.config.policy_path}: {exc}") from exc
        if not name:
            policy.pop("model_name", None)
        where = f"[models.{name}] over [default]" if name else "[default]"
        return {"source": f"{self.config.policy_path.name} {where}", **policy_record(policy)}

    def register(self, conn: Connection, cmd: VerifiedCommand) -> SlowWork:
        try:
            return self._register(conn, cmd)
        except Exception:
            self._discard(cmd, "upload")
            raise

    def validate(self, conn: Connection, cmd: VerifiedCommand) -> SlowWork:
        try:
            return self._validate(conn, cmd)
        except Exception:
            self._discard(cmd, "data_upload")
            raise

    def _discard(self, cmd: VerifiedCommand, field: str) -> None:
        """A command refused before its upload was read: drop the upload now rather than
        leave it to the staging stream's max age."""
        upload = cmd.body.get(field)
        if isinstance(upload, str):
            self.effects.discard_upload(cmd.operator.keyid, upload)

    def _register(self, conn: Connection, cmd: VerifiedCommand) -> SlowWork:
        name, version = model_ref(cmd.body)
        body = Body(cmd.body)
        digest, size = body.text("digest"), body.integer("size")
        upload = body.text("upload")
        lineage, card = body.map("lineage"), body.map("card")
        input_shapes = _input_shapes(cmd.body.get("input_shapes"))
        _check_unregistered(conn, name, version)
        keyid = cmd.operator.keyid

        async def inspect() -> Handler:
            with tempfile.TemporaryDirectory(prefix="hub-register-") as tmp:
                path = Path(tmp) / "model.tflite"
                # The operator's staged upload, checked and purged (hub/uploads.py).
                await self.effects.take_upload(keyid, upload, digest, size,
                                               self.config.uploads_max_bytes, path, "model")
                try:
                    # In a child process: a corrupt model can crash the TFLite runtime.
                    signature = (await asyncio.to_thread(
                        preflight, path, 120.0, input_shapes or None)).signature
                except ModelRuntimeError as exc:
                    raise CommandError(f"not a loadable TFLite model: {exc}") from exc
                # Only a model that loads reaches the (hub-only) models bucket; before the
                # entry that names it, so the ledger never names a blob the hub lacks.
                await self._store(digest, path, "model")

            def commit(conn: Connection, cmd: VerifiedCommand) -> Outcome:
                _check_unregistered(conn, name, version)  # a concurrent twin won
                payload = {
                    "name": name, "version": version, "digest": digest, "size": size,
                    "format": "tflite", "inputs": signature["inputs"],
                    "outputs": signature["outputs"], "lineage": lineage, "card": card,
                    **({"input_shapes": input_shapes} if input_shapes else {}),
                }
                event = command_event(cmd, ev.MODEL_REGISTERED, ev.model_subject(name, version),
                                      payload)
                result: dict[str, Any] = {"name": name, "version": version, "digest": digest,
                          "state": lc.REGISTERED}
                old = released_before(conn, name, version)
                changes = [] if old is None else signatures.differences(
                    signatures.signature(old), signatures.signature(payload))
                if old is not None and changes:  # told now; refused at release unless allowed
                    result["warnings"] = [
                        f"the signature differs from released {name}/{old['version']} "
                        f"({'; '.join(changes[:4])}); releasing it will need "
                        "--allow-signature-change"]
                return Outcome([event], result)

            return commit

        return inspect

    async def _store(self, digest: str, path: Path, what: str) -> None:
        try:
            await self.effects.store_blob(digest, path)
        except Exception as exc:
            raise CommandError(f"cannot store the {what} ({exc}); nothing was recorded: "
                               "try again once NATS is reachable") from exc

    async def _fetch_checked(self, digest: str, size: int, dest: Path, what: str) -> None:
        try:
            got = await self.effects.read_blob(digest, size, dest)
        except Exception as exc:
            raise CommandError(f"cannot read the uploaded {what}: {exc}") from exc
        if got != digest:
            raise CommandError(
                f"the stored {what} does not match digest {digest[:16]}…; upload it again"
            )

    def _validate(self, conn: Connection, cmd: VerifiedCommand) -> SlowWork:
        from hub import validation  # numpy-heavy; only when validating

        name, version = model_ref(cmd.body)
        row = require_release(conn, name, version)
        require_transition("validate", row)
        body = Body(cmd.body)
        data_digest, data_size = body.text("data_digest"), body.integer("data_size")
        data_upload = body.text("data_upload")
        keyid = cmd.operator.keyid
        if data_size > MAX_DATASET_BYTES:  # refused now, not in a job that reads nothing
            raise CommandError(f"the validation data is {data_size} bytes, over the "
                               f"{MAX_DATASET_BYTES}-byte limit for uploads")
        try:
            policy = validation.load_policy(self.config.policy_path, name)
        except validation.ValidationError as exc:
            raise CommandError(f"policy {self.config.policy_path}: {exc}") from exc

        async def evaluate() -> Handler:
            with tempfile.TemporaryDirectory(prefix="hub-validate-") as tmp:
                model_path, data_path = Path(tmp) / "model.tflite", Path(tmp) / "data.npz"
                # The staged data set (purged either way; over MAX_DATASET_BYTES is
                # refused unread), then the registered model from `models`.
                await self.effects.take_upload(keyid, data_upload, data_digest, data_size,
                                               MAX_DATASET_BYTES, data_path, "validation data")
                await self._fetch_checked(row["digest"], row["size"], model_path, "model")
                jobs.step(0.02)  # in a job: progress, and a cancel stops here
                try:
                    dataset = validation.load_dataset(data_path)
                    report = await asyncio.to_thread(
                        validation.validate, model_path, dataset, policy, 0,
                        _run_shapes(row["inputs"]), jobs.step)
                except validation.ValidationError as exc:
                    raise CommandError(f"validation could not run: {exc}") from exc
                # Kept (hub-only bucket) for audit: the entry names it by digest.
                await self._store(data_digest, data_path, "validation data")

            results = self._bounded_results({
                "name": name, "version": version, **report.to_payload(),
                "dataset_digest": data_digest, **policy_record(report.policy.to_payload()),
                "policy_file": self.config.policy_path.name,
                "approvals_required": int(policy.approvals_required),
            })
            await self._store_detail(results)
            payload = results.payload

            def commit(conn: Connection, cmd: VerifiedCommand) -> Outcome:
                # The state may have moved while the model ran (another validation,
                # a rejection): judge the transition again against the ledger as it is now.
                require_transition("validate", require_release(conn, name, version))
                event = command_event(cmd, ev.MODEL_VALIDATED, ev.model_subject(name, version),
                                      payload)
                return Outcome([event], {"name": name, "version": version,
                                         "passed": report.passed, "failures": report.failures,
                                         "warnings": report.warnings,
                                         "metrics": payload["metrics"],
                                         "policy": payload["policy"],
                                         "policy_digest": payload["policy_digest"],
                                         **({"detail": payload["detail"]}
                                            if "detail" in payload else {})})

            return commit

        return evaluate

    @staticmethod
    def _bounded_results(payload: dict[str, Any]) -> Bounded:
        """The model.validated payload within its size bound (hub.governance.results)."""
        result = bound_payload(payload)
        too_big = payload_too_big(result.payload)
        if too_big:
            raise CommandError(f"cannot record the validation: {too_big}")
        return result

    async def _store_detail(self, result: Bounded) -> None:
        """Put the detail document in the Object Store under its digest before the
        entry that names it is appended (an orphan blob is harmless; a dangling
        digest would not be)."""
        if result.detail is None or result.detail_digest is None:
            return
        try:
            await self.effects.put_blob(result.detail_digest, result.detail)
        except Exception as exc:
            raise CommandError(f"cannot store the validation detail: {exc}") from exc

    async def _reference_histograms(self, validation: dict[str, Any]) -> list[Any]:
        """The reference histograms of a validation: in the entry, or in its detail
        document (fetched by digest and checked)."""
        detail = validation.get("detail")
        if not isinstance(detail, dict) or "reference_histograms" not in detail.get(
                "parts", []):
            return list(validation.get("reference_histograms", []))
        with tempfile.TemporaryDirectory(prefix="hub-release-") as tmp:
            path = Path(tmp) / "detail"
            await self._fetch_checked(str(detail["digest"]), int(detail["size"]), path,
                                      "validation detail")
            try:
                doc = read_detail(path.read_bytes())
            except ValueError as exc:
                raise CommandError(f"the validation detail is unreadable: {exc}") from exc
        return list(doc.get("reference_histograms", []))

    def approve(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name, version = model_ref(cmd.body)
        row = require_release(conn, name, version)
        require_transition("approve", row)
        lc.check_approval(cmd.operator.keyid, row["registrant"], row["approvals"], name,
                          version)
        count = len(row["approvals"]) + 1
        payload = {"name": name, "version": version, "approvals": count,
                   "required": row["approvals_required"]}
        state = lc.APPROVED if count >= row["approvals_required"] else lc.VALIDATED
        return Outcome(
            [command_event(cmd, ev.MODEL_APPROVED, ev.model_subject(name, version), payload)],
            {**payload, "state": state},
        )

    @staticmethod
    def _simple_transition(conn: Connection, cmd: VerifiedCommand, action: str,
                           kind: str, need_reason: bool) -> Outcome:
        name, version = model_ref(cmd.body)
        require_transition(action, require_release(conn, name, version))
        reason = str(cmd.body.get("reason", ""))
        if need_reason and not reason:
            raise CommandError(f"{action} needs --reason: say why, for the record")
        payload = {"name": name, "version": version, "reason": reason}
        return Outcome([command_event(cmd, kind, ev.model_subject(name, version), payload)],
                       {**payload, "state": kind.split(".")[1]})

    def reject(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        return self._simple_transition(conn, cmd, "reject", ev.MODEL_REJECTED, True)

    def deprecate(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        return self._simple_transition(conn, cmd, "deprecate", ev.MODEL_DEPRECATED, False)

    def revoke(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        return self._simple_transition(conn, cmd, "revoke", ev.MODEL_REVOKED, True)

    async def release(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        """Sign the manifest, check its size and put it in KV, all before
        `model.released` is appended: the ledger never says released for a version
        devices cannot fetch. A manifest in KV whose release the ledger does not show
        (the append failed after the put) is harmless: devices act only on signed
        assignments, and deploy refuses a version that is not released."""
        name, version = model_ref(cmd.body)
        row = require_release(conn, name, version)
        require_transition("release", row)
        now = time.time_ns()
        histograms = await self._reference_histograms(row["validation"])
        manifest = proto.ReleaseManifest(
            name=name, version=version, digest=row["digest"], size=row["size"],
            format="tflite", inputs=row["inputs"], outputs=row["outputs"], created=now,
            expires=now + self.config.manifest_ttl_days * DAY_NS,
            drift_bins=[h.get("edges", []) for h in histograms if isinstance(h, dict)],
            drift_tensors=_drift_tensors(histograms),
            quantization=manifest_quantization(row["inputs"], row["outputs"]),
            # The shapes the hub validated at: devices resize dynamic inputs to them.
            input_shapes=_run_shapes(row["inputs"]),
        )
        envelope = proto.SignedEnvelope.sign(
            manifest.to_map(), proto.DOMAIN_MANIFEST, self.keyring.signers("release")
        ).encode()
        check_manifest_size(manifest, envelope)
        change = signature_change(conn, row, bool(cmd.body.get("allow_signature_change")))
        manifest_hash = blake3.blake3(envelope).hexdigest()
        payload = {"name": name, "version": version, "digest": row["digest"],
                   "manifest_hash": manifest_hash, "manifest": envelope,
                   "expires": manifest.expires, **change}
        try:
            # Devices read only the `releases` bucket: the blob goes there first (nothing
            # when it is there already), so a manifest never names a blob devices lack.
            await self.effects.release_blob(row["digest"], row["size"])
        except Exception as exc:
            raise CommandError(
                f"cannot publish the blob of {name}/{version} ({exc}); nothing was "
                "released: try again once NATS is reachable") from exc
        try:
            await self.effects.put_manifest(proto.manifest_key(name, version), envelope)
        except Exception as exc:
            raise CommandError(
                f"cannot publish the manifest of {name}/{version} ({exc}); nothing was "
                "released: try again once NATS is reachable") from exc
        return Outcome(
            [command_event(cmd, ev.MODEL_RELEASED, ev.model_subject(name, version), payload)],
            {"name": name, "version": version, "manifest_hash": manifest_hash,
             "state": lc.RELEASED, **change},
        )


def released_before(conn: Connection, name: str, version: str) -> dict[str, Any] | None:
    """The newest released version of `name` other than `version` (None: none is)."""
    rows = [r for r in governance.list_releases(conn, name)
            if r["state"] == lc.RELEASED and r["version"] != version]
    return rows[-1] if rows else None


def signature_change(conn: Connection, row: dict[str, Any], allowed: bool) -> dict[str, Any]:
    """{} when `row` keeps the signature of the released version of its model; else,
    if the operator allowed it, the `signature_change` record for model.released
    (old and new signature); if not, the refusal that says what changed.

    Checked at release, not registration: release is what makes a version deployable,
    and only then is it known which version the fleet runs (another may have been
    released, deprecated or revoked since this one was registered)."""
    old = released_before(conn, row["name"], row["version"])
    if old is None:
        return {}
    before, after = signatures.signature(old), signatures.signature(row)
    changes = signatures.differences(before, after)
    if not changes:
        return {}
    ref, old_ref = f"{row['name']}/{row['version']}", f"{old['name']}/{old['version']}"
    if not allowed:
        raise CommandError(
            f"cannot release {ref}: its signature differs from released {old_ref} "
            f"({'; '.join(changes[:8])}{'; ...' if len(changes) > 8 else ''}); applications "
            f"built for {old_ref} would break. If that is intended, release with "
            "--allow-signature-change (recorded in the ledger)")
    return {"signature_change": {"from_version": old["version"], "old": before,
                                 "new": after, "changes": changes}}


def policy_record(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy a validation used, for its ledger entry: the effective thresholds as a
    map and their digest (BLAKE3 of the map's canonical bytes), so a re-validation under
    another policy leaves a trace an auditor can check."""
    return {"policy": policy, "policy_digest": blake3.blake3(canonical_encode(policy)).hexdigest()}


MAX_INPUT_DIMS = 8


def _input_shapes(value: Any) -> dict[str, list[int]]:
    """The declared run shapes of a registration (`input_shapes`: input name -> shape),
    for models with dynamic inputs; {} when none are declared."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 64:
        raise CommandError("input_shapes must map input names to shapes, e.g. "
                           '{"audio": [1, 1280]}')
    out: dict[str, list[int]] = {}
    for key, shape in value.items():
        if (not isinstance(key, str) or not isinstance(shape, list)
                or not 1 <= len(shape) <= MAX_INPUT_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 20
                           for d in shape)):
            raise CommandError(f"input_shapes[{key!r}] must be a list of 1 to {MAX_INPUT_DIMS} "
                               f"positive dimensions, got {shape!r}")
        out[key] = [int(d) for d in shape]
    return out


def _drift_tensors(histograms: list[Any]) -> list[int]:
    try:
        return drift_tensors([h for h in histograms if isinstance(h, dict)])
    except ValueError as exc:
        raise CommandError(f"the validation's reference histograms are unusable: {exc}") from exc


def _run_shapes(inputs: list[Any]) -> dict[str, list[int]]:
    """The shape each input runs at, as registered (the declared run shape of a dynamic
    input is in its registered signature)."""
    return {str(t["name"]): [int(d) for d in t["shape"]] for t in inputs
            if isinstance(t, dict) and "name" in t and isinstance(t.get("shape"), list)}


def _check_unregistered(conn: Connection, name: str, version: str) -> None:
    if governance.get_release(conn, name, version) is not None:
        raise CommandError(
            f"model {name}/{version} is already registered; versions are immutable, "
            "register a new version"
        )
