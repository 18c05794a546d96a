"""Exporters: where collected metrics go (Prometheus, OTLP, structlog, JSONL, torchtune loggers)."""
