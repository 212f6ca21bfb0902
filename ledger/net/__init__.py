"""ledger.net."""
