"""Test infrastructure: the real programs the tests run (Prosody, Prometheus, the exporter) and a
real local Kubernetes control plane built from upstream Go modules (see README.md)."""
