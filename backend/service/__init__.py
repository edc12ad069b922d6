"""The service that wires the rest together: per-VM listeners, the daemon, configuration, CLI, metrics, systemd."""
