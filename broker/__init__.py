"""The federated ID-mapping broker."""

__version__ = "0.1.0"

DEMO_INSTALL_HINT = "pip install 'scim-id-broker[demo]'"
"""How to get what ``broker demo`` needs (scim2-server), for the CLI's help and the demo's errors."""
