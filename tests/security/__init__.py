"""Attacks on the trust boundary (issue 12), each against a real nats-server with the
configuration `hub init` writes and a real hub; see docs/SECURITY.md."""
