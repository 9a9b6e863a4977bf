"""Observability: message tracking, logging setup and metrics."""
