"""Metrics: the families the orchestrator records, the exporter, the report."""
