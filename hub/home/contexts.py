"""Operator profiles ("contexts"): how one person reaches a hub from their own machine.

A per-user TOML file (0600) at $FLEET_CONTEXTS, else
$XDG_CONFIG_HOME/fleetledger/contexts.toml (~/.config/... without XDG_CONFIG_HOME)::

    current = "prod"

    [contexts.prod]
    nats = "tls://hub.example:4222"     # the hub's NATS URL
    ca = "/home/ana/prod-ca.pem"        # CA of the server's TLS certificate (optional)
    key = "/home/ana/ana.key"           # the operator's own Ed25519 key
    audience = "https://hub.example/fleet"  # the hub's origin: what commands are signed for
    auth = "nkey"                       # "nkey": the key is the NATS identity; "none"

It holds no hub secret: the NATS identity of an operator is their own key (an nkey made
from it, hub.home.nats_config), so a context needs only that key, the URL, the CA and
the hub's origin. `hub` uses the current context when neither --home nor
FLEET_HUB_HOME is given (hub/cli/_common.py, `hub_config`).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.transport.connect import NatsAuth, nkey_seed
from hub.errors import UsageError
from hub.home.config import HubConfig
from hub.home.nats_config import operator_inbox_prefix
from ledger.durable import atomic_write
from ledger.signing import SigningKey

CONTEXTS_ENV = "FLEET_CONTEXTS"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
AUTH_MODES = ("nkey", "none")


class ContextError(UsageError):
    """The contexts file or a context in it is missing or invalid (exit 2)."""


@dataclass(frozen=True)
class Context:
    name: str
    nats: str
    key: str
    audience: str
    ca: str | None = None
    auth: str = "nkey"


@dataclass(frozen=True)
class ContextConfig(HubConfig):
    """A HubConfig made from a context instead of a hub home: the NATS URL, the hub's
    origin, the operator's own key and the CA; nothing of the hub's secrets. `home` is
    the contexts file's directory (where `hub operator add` writes a new key)."""

    context: str = ""
    own_key: Path = Path()
    ca_file: Path | None = None
    nkey: bool = True

    def operator_auth(self, key: SigningKey) -> NatsAuth:
        if not self.nkey:
            return NatsAuth(ca_file=self.ca_file)
        return NatsAuth(nkey_seed=nkey_seed(key.private_raw()), ca_file=self.ca_file,
                        inbox_prefix=operator_inbox_prefix(key.keyid))


def contexts_path() -> Path:
    if os.environ.get(CONTEXTS_ENV):
        return Path(os.environ[CONTEXTS_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleetledger" / "contexts.toml"


@dataclass
class Contexts:
    path: Path
    current: str | None
    contexts: dict[str, Context]

    @classmethod
    def load(cls, path: Path | None = None) -> Contexts:
        path = path or contexts_path()
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            return cls(path, None, {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ContextError(f"cannot read the contexts file {path}: {exc}") from exc
        found: dict[str, Context] = {}
        table = raw.get("contexts", {})
        if not isinstance(table, dict):
            raise ContextError(f"{path}: [contexts] must be a table")
        for name, doc in table.items():
            try:
                found[name] = Context(name, str(doc["nats"]), str(doc["key"]),
                                      str(doc["audience"]),
                                      str(doc["ca"]) if doc.get("ca") else None,
                                      str(doc.get("auth", "nkey")))
            except (KeyError, TypeError, AttributeError) as exc:
                raise ContextError(f"{path}: context {name!r} lacks {exc}; remove it and "
                                   "add it again with `hub context add`") from exc
        current = raw.get("current")
        return cls(path, str(current) if current else None, found)

    def save(self) -> None:
        lines = []
        if self.current:
            lines += [f"current = {_toml(self.current)}", ""]
        for c in sorted(self.contexts.values(), key=lambda c: c.name):
            lines.append(f"[contexts.{_toml(c.name)}]")
            for key, value in asdict(c).items():
                if key != "name" and value is not None:
                    lines.append(f"{key} = {_toml(value)}")
            lines.append("")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, "\n".join(lines).encode(), 0o600)
        except OSError as exc:
            raise ContextError(f"cannot write {self.path}: {exc}") from exc

    def get(self, name: str) -> Context:
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise ContextError(f"no context {name!r} in {self.path} (known: {known}); "
                               "add it with `hub context add`")
        return self.contexts[name]

    def current_context(self) -> Context | None:
        if self.current is None:
            return None
        if self.current not in self.contexts:
            raise ContextError(f"the current context {self.current!r} is not in "
                               f"{self.path}; choose one with `hub context use NAME`")
        return self.contexts[self.current]


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ContextError(f"invalid context name {name!r}: use 1-64 letters, digits, "
                           "'.', '-' or '_'")
    return name


def config_of(context: Context, path: Path, nats_url: str | None = None) -> ContextConfig:
    """The HubConfig the operator commands use, from a context (`nats_url`: --nats)."""
    return ContextConfig(
        home=path.parent, nats_url=nats_url or context.nats, database="",
        origin=context.audience, context=context.name, own_key=Path(context.key),
        ca_file=Path(context.ca) if context.ca else None, nkey=context.auth != "none")


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
