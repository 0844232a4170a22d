"""Security Event Tokens per domain: SCIM events (RFC 9967) in SETs (RFC 8417), signing keys and JWKS."""
