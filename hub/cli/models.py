"""`hub model ...`: register, validate, approve, reject, release, deprecate, revoke, list,
show and history of model versions."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from hub.cli._common import (
    EXIT_REFUSED,
    HOME,
    JSON,
    KEY,
    NATS_URL,
    TIMEOUT,
    call,
    err,
    examples,
    hub_config,
    key_column,
    model_ref,
    out,
    resolve_ref,
    rfc3339,
    run,
    show,
    utc_time,
)
from hub.client import HubClient, file_digest
from hub.commands.envelope import command_actor_and_signature, command_signature_valid
from hub.errors import UsageError

model_app = typer.Typer(
    help="Model versions: register, validate, approve, release, show, history.",
    no_args_is_help=True,
    epilog=examples(
    'hub model register models/model-v1.tflite kws/1 --home hub-home',
    'hub model validate kws/1 --data models/kws-v1.npz --home hub-home',
    'hub model approve kws/1 --key hub-home/operators/alice.key --home hub-home',
    'hub model release kws/1 --home hub-home',
    'hub model list --home hub-home',
),
)


def _kv_pairs(items: list[str], what: str) -> dict[str, Any]:
    out_map: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        try:
            out_map[k] = float(v) if "." in v or "e" in v.lower() else int(v)
        except ValueError:
            out_map[k] = v
    return out_map


@model_app.command("register", epilog=examples(
    'hub model register models/model-v1.tflite kws/1 --home hub-home',
    'hub model register models/model-v1.tflite --name kws --version 1 --home hub-home',
    "hub model register models/model-v2.tflite kws/2 --intended-use 'wake word' "
    "--owner ml-team --code-ref abc123 --metric accuracy=0.93 --home hub-home",
))
def model_register(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The .tflite file."),
    ref: str | None = typer.Argument(None, help="NAME/VERSION, e.g. kws/3 (or --name and "
                                     "--version).", metavar="[NAME/VERSION]"),
    name: str | None = typer.Option(None, "--name", help="Model name, e.g. kws (or kws/3)."),
    version: str | None = typer.Option(None, "--version", help="Version label, e.g. 3."),
    card_file: Path | None = typer.Option(
        None, "--card", exists=True, dir_okay=False,
        help="TOML with [card] (intended_use, limitations, owners) and [lineage] tables.",
    ),
    intended_use: str | None = typer.Option(None, "--intended-use", help="Model card text."),
    limitation: list[str] = typer.Option([], "--limitation", help="Repeatable."),
    owner: list[str] = typer.Option([], "--owner", help="Repeatable."),
    training_data: str | None = typer.Option(
        None, "--training-data", help="Training data file (hashed here) or its digest."
    ),
    code_ref: str | None = typer.Option(None, "--code-ref", help="e.g. git commit of training."),
    param: list[str] = typer.Option([], "--param", help="Training parameter KEY=VALUE."),
    metric: list[str] = typer.Option([], "--metric", help="Training metric KEY=VALUE."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Upload FILE to the Object Store under its BLAKE3 digest and register it with its
    lineage and model card (needs the registrant role). The hub checks that it loads with
    the TFLite runtime. Next: `hub model validate NAME/VERSION --data FILE.npz`."""
    name, version = resolve_ref(ref, name, version)
    card: dict[str, Any] = {}
    lineage: dict[str, Any] = {}
    if card_file is not None:
        try:
            doc = tomllib.loads(card_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{card_file}: {exc}") from exc
        card, lineage = dict(doc.get("card", {})), dict(doc.get("lineage", {}))
    if intended_use:
        card["intended_use"] = intended_use
    if limitation:
        card["limitations"] = limitation
    if owner:
        card["owners"] = owner
    if training_data:
        path = Path(training_data)
        lineage["training_data_digest"] = (
            file_digest(path)[0] if path.is_file() else training_data
        )
    if code_ref:
        lineage["code_ref"] = code_ref
    if param:
        lineage["params"] = _kv_pairs(param, "--param")
    if metric:
        lineage["metrics"] = _kv_pairs(metric, "--metric")
    config = hub_config(home, nats_url)
    result = run(config, key, timeout,
                 lambda c: c.register_model(file, name, version, lineage, card))
    def render(r: dict[str, Any]) -> None:
        out.print(f"registered [bold]{name}/{version}[/bold] digest {r['digest'][:16]}… "
                  f"(ledger seq {r['seq'][0]}); next: hub model validate {name}/{version} "
                  f"--data FILE.npz")
        for warning in r.get("warnings") or []:
            out.print(f"[yellow]warning[/yellow]: {escape(warning)}")

    show(result, as_json, render)


@model_app.command("validate", epilog=examples(
    '.venv/bin/python scripts/make_validation_data.py models/kws-v1.npz --version 1',
    'hub model validate kws/1 --data models/kws-v1.npz --home hub-home',
    'hub model validate kws/1 --data models/kws-v1.npz --no-wait --home hub-home',
))
def model_validate(
    ref: str = typer.Argument(..., help="NAME/VERSION"),
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False,
                              help=".npz with `inputs` (or `inputs/<tensor name>` per input "
                                   "of a multi-input model), optional labels, groups, "
                                   "sequences."),
    no_wait: bool = typer.Option(False, "--no-wait",
                                 help="Print the job id and return; follow it with "
                                      "`hub model validation JOB`."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="A progress bar on stderr while waiting."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Run the validation gate: the hub runs the model with the TFLite runtime on the data
    and checks quality, fairness gap, robustness, latency against HOME/policy.toml. The
    hub runs it as a job; this waits for it with a progress bar (Ctrl-C leaves the job
    running; --no-wait prints its id). The result is recorded either way; exit 1 if it
    failed, was refused or cancelled."""
    name, version = model_ref(ref)
    config = hub_config(home, nats_url)

    def render(result: dict[str, Any]) -> None:
        _print_metrics(result["metrics"])
        if result["passed"]:
            out.print(f"[green]validation passed[/green] for {ref}; next: hub model approve {ref}"
                      " (by an approver who did not register it)")
        else:
            out.print(f"[red]validation failed[/red] for {ref}:")
            for failure in result["failures"]:
                out.print(f"  - {failure}")
        for warning in result.get("warnings") or []:
            out.print(f"[yellow]warning[/yellow]: {warning}")

    if no_wait:
        show(run(config, key, timeout,
                 lambda c: c.validate_model(name, version, data, wait=False)),
             as_json, lambda r: out.print(
                 f"validation of {ref} started: job {r['job']}; follow it with "
                 f"hub model validation {r['job']}"))
        return

    async def wait(client: HubClient) -> Any:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                      TextColumn("{task.fields[detail]}"), console=err,
                      disable=not progress or as_json) as bar:
            task = bar.add_task(f"validate {ref}", total=1.0, detail="uploading")

            def on_status(status: dict[str, Any]) -> None:
                bar.update(task, completed=float(status.get("progress", 0.0)),
                           detail=f"{status.get('state')} {status.get('elapsed_s', 0):.1f} s "
                                  f"({status.get('job')})")

            return await client.validate_model(name, version, data, on_status=on_status)

    result = show(run(config, key, timeout, wait), as_json, render)
    if not result["passed"]:
        raise typer.Exit(EXIT_REFUSED)


@model_app.command("validation", epilog=examples(
    'hub model validation job-0123456789abcdef --home hub-home',
    'hub model validation job-0123456789abcdef --json --home hub-home',
    'hub model validation job-0123456789abcdef --cancel --home hub-home',
))
def model_validation(
    job: str = typer.Argument(..., help="The job id `hub model validate` printed."),
    cancel: bool = typer.Option(False, "--cancel",
                                help="Stop the job at its next step; it records nothing "
                                     "(registrant or operator role)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """A validation job's status: queued, running, done, failed or cancelled, with its
    progress and elapsed time (the result once done). A job that was running when the
    hub stopped is failed ("hub restarted"). Exit 1 for a failed or cancelled job."""
    verb = "model.validation.cancel" if cancel else "model.validation"

    def render(status: dict[str, Any]) -> None:
        state = status["state"]
        color = {"done": "green", "failed": "red", "cancelled": "yellow"}.get(state, "cyan")
        out.print(f"{status['job']} ({escape(status['subject'])}): [{color}]{state}[/{color}]"
                  f" {100 * float(status['progress']):.0f}% after {status['elapsed_s']:.1f} s")
        if status.get("cancel_requested"):
            out.print("cancel requested: the job stops at its next step and records nothing")
        if status.get("error"):
            out.print(f"  {escape(str(status['error']))}")
        result = status.get("result")
        if isinstance(result, dict) and "passed" in result:
            out.print("  validation " + ("passed" if result["passed"] else "failed: "
                                         + "; ".join(result.get("failures", []))))

    status = show(call(hub_config(home, nats_url), key, timeout, verb, {"job": job}),
                  as_json, render)
    if status["state"] in ("failed", "cancelled"):
        raise typer.Exit(EXIT_REFUSED)


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table("metric", "value", title="validation")
    for k, v in sorted(metrics.items()):
        if isinstance(v, float):
            table.add_row(k, f"{v:.4g}")
        elif isinstance(v, int | str):
            table.add_row(k, str(v))
        elif isinstance(v, dict) and all(isinstance(x, int | float) for x in v.values()):
            table.add_row(k, ", ".join(f"{a}={b:.3g}" for a, b in v.items()))
        elif isinstance(v, list) and all(isinstance(x, int | float) for x in v):
            table.add_row(k, ", ".join(f"{x:.3g}" for x in v))
    out.print(table)


TRANSITION_EXAMPLES = {
    'approve': [
        'hub model approve kws/1 --key hub-home/operators/alice.key --home hub-home',
    ],
    'reject': [
        "hub model reject kws/1 --reason 'too noisy on site-b' "
        "--key hub-home/operators/alice.key --home hub-home",
    ],
    'deprecate': [
        "hub model deprecate kws/1 --reason 'superseded by kws/2' --home hub-home",
    ],
    'revoke': [
        "hub model revoke kws/1 --reason 'leaks data' --home hub-home",
    ],
}


def _transition_command(verb: str, doc: str) -> None:
    def command(
        ref: str = typer.Argument(..., help="NAME/VERSION"),
        reason: str = typer.Option("", "--reason", help="Why, for the record."),
        home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
        as_json: bool = JSON, timeout: float = TIMEOUT,
    ) -> None:
        name, version = model_ref(ref)
        body: dict[str, Any] = {"name": name, "version": version}
        if reason:
            body["reason"] = reason

        def render(result: dict[str, Any]) -> None:
            extra = ""
            if verb == "approve":
                extra = f" ({result['approvals']} of {result['required']} approvals)"
            out.print(f"{ref}: {result['state']}{extra}")

        show(call(hub_config(home, nats_url), key, timeout, f"model.{verb}", body), as_json,
             render)

    command.__doc__ = doc
    model_app.command(verb, epilog=examples(*TRANSITION_EXAMPLES[verb]))(command)


_transition_command("approve", "Approve a validated version (needs the approver role; the "
                    "registrant cannot approve; policy says how many approvals are needed).")
_transition_command("reject", "Reject a version (approver role; --reason required).")


@model_app.command("release", epilog=examples(
    'hub model release kws/1 --home hub-home',
    'hub model release kws/2 --allow-signature-change --home hub-home',
))
def model_release(
    ref: str = typer.Argument(..., help="NAME/VERSION"),
    allow_signature_change: bool = typer.Option(
        False, "--allow-signature-change",
        help="Release even though its input/output signature differs from the released "
             "version's (the old and new signatures are recorded in the ledger)."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Release an approved version (operator role): the hub signs its release manifest,
    puts it where devices fetch it, then records the release. A version whose signature
    differs from the released one's is refused unless --allow-signature-change."""
    name, version = model_ref(ref)
    body: dict[str, Any] = {"name": name, "version": version}
    if allow_signature_change:
        body["allow_signature_change"] = True

    def render(result: dict[str, Any]) -> None:
        out.print(f"{ref}: {result['state']}")
        change = result.get("signature_change")
        if change:
            out.print(f"[yellow]signature changed[/yellow] from {name}/{change['from_version']}:"
                      f" {escape('; '.join(change['changes']))}")

    show(call(hub_config(home, nats_url), key, timeout, "model.release", body), as_json, render)


def _since_ns(text: str) -> int:
    """--since: an ISO 8601 time (UTC unless it says otherwise) or integer nanoseconds."""
    from datetime import UTC, datetime

    if text.isdigit():
        return int(text)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r} is not an ISO 8601 time (e.g. "
                         "2026-05-01T12:00:00Z) or integer nanoseconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp()) * 1_000_000_000 + parsed.microsecond * 1000


@model_app.command("rebase", epilog=examples(
    'hub model rebase kws/1 --rollout r-1 --home hub-home',
    'hub model rebase kws/1 --since 2026-05-01T00:00:00Z --min-inferences 5000 --home hub-home',
    'hub model rebase kws/1 --json --home hub-home',
))
def model_rebase(
    ref: str = typer.Argument(..., help="NAME/VERSION (released)"),
    rollout: str | None = typer.Option(None, "--rollout",
                                       help="Only the traffic of this rollout's devices."),
    since: str | None = typer.Option(
        None, "--since", help="Only assignments whose first telemetry window started at or "
        "after this time (ISO 8601 or integer nanoseconds)."),
    min_inferences: int = typer.Option(1000, "--min-inferences", min=1,
                                       help="Refuse with fewer inferences than this."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Re-base the drift reference of a released version on the output histograms its
    fleet reported (operator role): after a baking period, PSI is computed against what
    devices really produced rather than against the validation set. The bins stay the
    manifest's; the new counts, their source and the previous reference's digest are
    recorded in the ledger (model.reference_rebased). Refused with too little traffic or
    an output that fell in fewer than 2 bins."""
    name, version = model_ref(ref)
    if rollout is not None and since is not None:
        raise UsageError("give --rollout or --since, not both")
    body: dict[str, Any] = {"name": name, "version": version, "min_inferences": min_inferences}
    if rollout is not None:
        body["rollout"] = rollout
    if since is not None:
        body["since_ns"] = _since_ns(since)

    def render(result: dict[str, Any]) -> None:
        src = result["source"]
        where = (f"rollout {src['rollout']}" if "rollout" in src else
                 f"assignments since {utc_time(src['since'])}" if "since" in src else
                 "the whole fleet")
        out.print(f"{ref}: drift reference re-based on {src['inferences']:,} inferences from "
                  f"{src['devices']} device(s) ({where}); {result['outputs']} output value(s); "
                  f"reference {result['reference_digest'][:16]}… (was "
                  f"{result['previous_digest'][:16]}…)")

    show(call(hub_config(home, nats_url), key, timeout, "model.rebase", body), as_json, render)


_transition_command("deprecate", "Mark a released version deprecated (operator role).")
_transition_command("revoke", "Revoke a version; it can no longer be deployed (--reason).")


@model_app.command("list", epilog=examples(
    'hub model list --home hub-home',
    'hub model list --json --home hub-home',
))
def model_list(home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
               as_json: bool = JSON, timeout: float = TIMEOUT) -> None:
    """List registered model versions and where each is in its lifecycle."""
    def render(rows: list[dict[str, Any]]) -> None:
        table = Table("model", "version", "state", "approvals", "size", "digest")
        for r in rows:
            table.add_row(r["name"], r["version"], r["state"],
                          f"{len(r['approvals'])}/{r['approvals_required']}",
                          f"{r['size']:,}", r["digest"][:16])
        out.print(table)

    rows = call(hub_config(home, nats_url), key, timeout, "models")
    show([version_json(r) for r in rows] if as_json else rows, as_json, render)


@model_app.command("show", epilog=examples(
    'hub model show kws/1 --home hub-home',
    'hub model show kws --home hub-home    (every version)',
))
def model_show(
    ref: str = typer.Argument(..., help="NAME or NAME/VERSION"),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Render the model card: intended use, limitations, owners, lineage, validation
    numbers (with feature importance) and approvals."""
    name, _, version = ref.partition("/")
    body: dict[str, Any] = {"name": name}
    if version:
        body["version"] = version

    def render(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            card, lineage, validation = r["card"], r["lineage"], r["validation"]
            out.rule(f"[bold]{r['name']}/{r['version']}[/bold] — {r['state']}")
            out.print(f"digest {r['digest']}  size {r['size']:,} bytes")
            out.print(f"intended use: {card.get('intended_use', '-')}")
            for item in card.get("limitations", []) or []:
                out.print(f"limitation: {item}")
            out.print(f"owners: {', '.join(card.get('owners', []) or ['-'])}")
            for k, v in sorted(lineage.items()):
                out.print(f"lineage {k}: {v}")
            for side in ("inputs", "outputs"):
                for t in r.get(side) or []:
                    out.print(f"{side[:-1]} {tensor_text(t)}")
            if validation:
                verdict = "passed" if validation.get("passed") else "failed"
                out.print(f"validation: {verdict}; failures: "
                          f"{validation.get('failures') or 'none'}")
                for warning in validation.get("warnings") or []:
                    out.print(f"[yellow]warning[/yellow]: {warning}")
                _print_metrics(validation.get("metrics", {}))
                policy = validation.get("policy")
                if isinstance(policy, dict):
                    out.print(f"policy {str(validation.get('policy_digest', ''))[:16]}…: "
                              f"{policy_text(policy)}")
                detail = validation.get("detail")
                if isinstance(detail, dict):
                    out.print(f"full results ({', '.join(detail.get('parts', []))}): "
                              f"Object Store blob {detail.get('digest')} "
                              f"({detail.get('size', 0):,} bytes)")
                rebased = validation.get("rebased")
                if isinstance(rebased, dict):
                    out.print(rebased_text(rebased))
            out.print(f"approvals: {len(r['approvals'])}/{r['approvals_required']}")

    rows = call(hub_config(home, nats_url), key, timeout, "model.show", body)
    show([version_json(r) for r in rows] if as_json else rows, as_json, render)


def version_json(row: dict[str, Any]) -> dict[str, Any]:
    """A model version for --json: null, not "", for no manifest (not released) and no
    reason; an RFC 3339 `registered` beside the ledger's `registered_ts`."""
    return {**row, "manifest_hash": row.get("manifest_hash") or None,
            "reason": row.get("reason") or None,
            "registered": rfc3339(row.get("registered_ts"))}


def rebased_text(rebased: dict[str, Any]) -> str:
    """The line `hub model show` prints for a drift reference re-based on fleet traffic."""
    src = rebased.get("source")
    if not isinstance(src, dict):
        src = {}
    where = (f"rollout {src['rollout']}" if "rollout" in src else
             f"assignments since {utc_time(int(src['since']))}" if "since" in src else
             "the whole fleet")
    return (f"drift reference re-based on {int(src.get('inferences', 0)):,} inferences from "
            f"{src.get('devices', 0)} device(s) ({escape(where)}); reference "
            f"{str(rebased.get('reference_digest', ''))[:16]}…")


def tensor_text(t: Any) -> str:
    """One tensor of a signature: `name [1, 8] int8 scale=0.0425 zero_point=-27`
    ("not quantized" for a float tensor; "quantization not recorded" for a model
    registered before it was)."""
    if not isinstance(t, dict):
        return str(t)
    text = f"{escape(str(t.get('name', '?')))} {t.get('shape')} {t.get('dtype')}"
    q = t.get("quantization")
    if not isinstance(q, dict):
        return f"{text} (quantization not recorded)"
    if not q.get("scale"):
        return f"{text} not quantized"
    return f"{text} scale={q['scale']:.6g} zero_point={q.get('zero_point')}"


def _signature(e: dict[str, Any], keys: dict[str, dict[str, Any]]) -> str:
    """Whether the operator command behind ledger event `e` is signed by its actor."""
    command = e["payload"].get("command")
    if not isinstance(command, bytes):
        return "n/a (hub)" if e["actor"] == "hub" else "unsigned"
    try:
        signer = command_actor_and_signature(command)[0]
    except ValueError:
        signer = ""
    op = keys.get(signer)
    valid = (op is not None and signer == e["actor"]
             and command_signature_valid(command, op["public"]))
    return "valid" if valid else "INVALID"


@model_app.command("history", epilog=examples(
    'hub model history kws --home hub-home',
    'hub model history kws --json --home hub-home',
))
def model_history(
    name: str = typer.Argument(..., help="Model name."),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Every ledger event about a model: who did what and when, and whether each
    operator's signature checks (verified here, with the operators' public keys)."""
    result = call(hub_config(home, nats_url), key, timeout, "model.history", {"name": name})
    keys = {o["keyid"]: o for o in result["operators"]}
    # --json: RFC 3339 times, model and version apart (version null for a model-wide
    # event such as a policy change), the actor's key id beside its name.
    rows = []
    for e in result["events"]:
        model, _, version = e["subject"].removeprefix("model:").partition("/")
        rows.append({"seq": e["seq"], "ts": e["ts"], "time": rfc3339(e["ts"]),
                     "event": e["kind"], "model": model, "version": version or None,
                     "actor": keys.get(e["actor"], {}).get("name", e["actor"]),
                     "keyid": e["actor"] if e["actor"] in keys else None,
                     "signature": _signature(e, keys)})

    def render(rows: list[dict[str, Any]]) -> None:
        table = Table(key_column("seq", 4), "time (UTC)", "event", "model", "actor", "signature",
                      title=f"history of {name}")
        for r in rows:
            style = "red" if r["signature"] == "INVALID" else None
            table.add_row(str(r["seq"]), utc_time(r["ts"]), r["event"],
                          r["model"] + (f"/{r['version']}" if r["version"] else ""),
                          r["actor"], r["signature"], style=style)
        out.print(table)

    show(rows, as_json, render)
    if any(r["signature"] == "INVALID" for r in rows):
        raise typer.Exit(EXIT_REFUSED)


def policy_text(policy: dict[str, Any]) -> str:
    """A policy map on one line: `task=classification min_accuracy=0.9 ...`."""
    return " ".join(f"{k}={v}" for k, v in sorted(policy.items()) if k != "model_name")


policy_app = typer.Typer(
    help="The validation policy: thresholds and approvals, per model name.",
    no_args_is_help=True,
    epilog=examples('hub policy show kws --home hub-home'),
)


@policy_app.command("show", epilog=examples(
    'hub policy show --home hub-home',
    'hub policy show kws --home hub-home',
    'hub policy show kws/1 --json --home hub-home',
))
def policy_show(
    ref: str | None = typer.Argument(None, help="NAME (its policy now) or NAME/VERSION (the "
                                     "one its last validation recorded); none: [default].",
                                     metavar="[NAME[/VERSION]]"),
    home: Path = HOME, nats_url: str | None = NATS_URL, key: Path | None = KEY,
    as_json: bool = JSON, timeout: float = TIMEOUT,
) -> None:
    """Print the effective policy: for NAME the hub's policy file with [models.NAME]
    over [default]; for NAME/VERSION the thresholds recorded in its model.validated
    entry, with their digest."""
    name, _, version = (ref or "").partition("/")
    body: dict[str, Any] = {}
    if name:
        body["name"] = name
    if version:
        body["version"] = version

    def render(result: dict[str, Any]) -> None:
        table = Table("key", "value", title=f"policy from {escape(result['source'])}")
        for k, v in sorted(result["policy"].items()):
            table.add_row(k, str(v))
        out.print(table)
        out.print(f"digest {result['policy_digest']}")

    show(call(hub_config(home, nats_url), key, timeout, "policy.show", body), as_json, render)
