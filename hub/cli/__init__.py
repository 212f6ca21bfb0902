"""`hub`: the operator's command line for the fleetledger control plane.

This module only assembles: each command group lives in its own module (`serve`,
`operators`, `models`, `devices`, `keys`, `rollouts`, `telemetry`, `contexts`), which imports
`_common` and nothing else of the CLI. Imports run __init__ -> group -> _common ->
hub.client; no server module is imported (`serve` and `rebuild` load theirs inside).
"""

from __future__ import annotations

import sys

import typer

from hub.cli import (
    contexts,
    devices,
    keys,
    models,
    offline_root,
    operators,
    rollouts,
    serve,
    sites,
    telemetry,
)
from hub.cli._common import HELP_OPTIONS, HubGroup, examples, version_option

__all__ = ["app", "main"]

app = typer.Typer(
    cls=HubGroup,
    help=(
        "Operate the fleetledger hub: register, validate, approve and release models, enroll "
        "devices, deploy, and watch the fleet. Every command is signed with your operator key "
        "and recorded in the hash-chained ledger (check it with `ledger verify`).\n\n"
        "Start with `hub init DIR`, then `hub serve --home DIR`. The lifecycle of a model: "
        "register -> validate -> approve (by someone other than the registrant) -> release "
        "-> deploy."
    ),
    no_args_is_help=True,
    context_settings=HELP_OPTIONS,
    epilog=examples(
        "hub init hub-home --nats nats://127.0.0.1:4222",
        "hub serve --home hub-home",
        "hub status --home hub-home --wait 30",
        "hub model list --home hub-home",
        "hub --install-completion    (tab completion for your shell)",
    ),
)


@app.callback()
def _root(version: bool = version_option("hub")) -> None:
    pass


device_app = typer.Typer(
    help="Enroll devices; what each device said it ran.", no_args_is_help=True,
    epilog=examples("hub device enroll dev-1 --home hub-home",
                    "hub device show dev-1 --home hub-home",
                    "hub device history dev-1 --home hub-home",
                    "hub device tag dev-1 --group lab --tag site=a --home hub-home",
                    "hub device revoke dev-1 --reason lost --home hub-home",
                    "hub device token create dev-7 --home hub-home"))
device_app.add_typer(devices.device_commands)  # enroll, revoke, show, history
device_app.add_typer(rollouts.device_commands)  # tag
device_app.add_typer(devices.token_commands, name="token")  # token create

# In the order `hub --help` lists them; a Typer added without a name adds its commands.
app.add_typer(serve.commands)  # init, serve, status, whoami, rebuild
app.add_typer(devices.commands)  # devices, deploy
app.add_typer(telemetry.commands)  # telemetry
app.add_typer(models.model_app, name="model")
app.add_typer(models.policy_app, name="policy")
app.add_typer(device_app, name="device")
app.add_typer(operators.operator_app, name="operator")
keys.keys_app.add_typer(offline_root.root_app, name="root")  # hub keys root ...
app.add_typer(keys.keys_app, name="keys")
app.add_typer(keys.witness_app, name="witness")
app.add_typer(rollouts.rollout_app, name="rollout")
app.add_typer(contexts.context_app, name="context")
app.add_typer(sites.site_app, name="site")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
