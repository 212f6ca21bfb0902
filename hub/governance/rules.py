"""The model version lifecycle as a state machine (pure).

    registered -> validated | validation_failed      (validate; re-validate after a failure)
    validated  -> approved  (after N approvals, none by the registrant: four eyes)
    registered | validated | validation_failed -> rejected
    approved   -> released -> deprecated
    approved | released | deprecated -> revoked
"""

from __future__ import annotations

from typing import Final

from hub.errors import Refused

REGISTERED: Final = "registered"
VALIDATED: Final = "validated"
VALIDATION_FAILED: Final = "validation_failed"
APPROVED: Final = "approved"
REJECTED: Final = "rejected"
RELEASED: Final = "released"
DEPRECATED: Final = "deprecated"
REVOKED: Final = "revoked"

# action -> states it may start from
ALLOWED_FROM: Final[dict[str, tuple[str, ...]]] = {
    "validate": (REGISTERED, VALIDATION_FAILED),
    "approve": (VALIDATED,),
    "reject": (REGISTERED, VALIDATED, VALIDATION_FAILED),
    "release": (APPROVED,),
    "deprecate": (RELEASED,),
    "revoke": (APPROVED, RELEASED, DEPRECATED),
    "deploy": (RELEASED,),
}

_HINTS: Final[dict[str, str]] = {
    "validate": "hub model validate {ref} --data FILE.npz",
    "approve": "hub model approve {ref}",
    "reject": "hub model reject {ref} --reason TEXT",
    "release": "hub model release {ref}",
    "deprecate": "hub model deprecate {ref}",
    "revoke": "hub model revoke {ref} --reason TEXT",
    "deploy": "hub deploy --model {name} --version {version} --all",
}


class TransitionRefused(Refused):
    """The action is not allowed in the model's current state."""


def next_actions(state: str) -> list[str]:
    return [action for action, sources in ALLOWED_FROM.items() if state in sources]


def check_transition(action: str, state: str, name: str, version: str) -> None:
    if state in ALLOWED_FROM.get(action, ()):
        return
    ref = f"{name}/{version}"
    options = next_actions(state)
    if options:
        hints = "; ".join(_HINTS[a].format(ref=ref, name=name, version=version) for a in options)
        allowed = f"allowed next: {hints}"
    else:
        allowed = "nothing more can happen to it"
    raise TransitionRefused(f"cannot {action} {ref}: it is {state}; {allowed}")


def check_approval(approver: str, registrant: str, approvals: list[str], name: str,
                   version: str) -> None:
    """Four eyes: the registrant never approves, and nobody approves twice."""
    ref = f"{name}/{version}"
    if approver == registrant:
        raise TransitionRefused(
            f"cannot approve {ref}: you registered it; another approver must (four eyes)"
        )
    if approver in approvals:
        raise TransitionRefused(f"cannot approve {ref}: you already approved it")
