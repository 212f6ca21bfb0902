"""Fault tests with real processes (issue 13): injected storage failures, poison input."""
