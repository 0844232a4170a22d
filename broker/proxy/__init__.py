"""The domain-facing SCIM endpoint: authenticate the domain, translate, forward to home, guard."""
