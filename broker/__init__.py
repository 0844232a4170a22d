"""The federated ID-mapping broker."""

__version__ = "0.1.0"
