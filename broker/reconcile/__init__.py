"""Reconciliation of a peer against home and the mapping table, and the initial sync of a push
domain (docs/reconciliation.md)."""
