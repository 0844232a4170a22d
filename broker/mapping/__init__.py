"""The identity map: merge and split rules (pure) and the PostgreSQL store that applies them."""
