"""Sidecar exporter: the only client of Prosody's metrics endpoint, re-serving it to pods."""

__version__ = "0.1.0"
