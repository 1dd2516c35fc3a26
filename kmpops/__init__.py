"""kmp-ops core library: configuration, plans, connectors and records (no Prefect here)."""

__version__ = "0.1.0"
