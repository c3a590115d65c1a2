"""tether: when a session ends, every process that belonged to it dies."""

__version__ = "0.1.0"
