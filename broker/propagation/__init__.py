"""Asynchronous propagation to push peers: the outbox, its workers, and the home poller."""
