"""Operator: injects the prosody-exporter sidecar and keeps Services and ServiceMonitors in step."""

__version__ = "0.1.0"
