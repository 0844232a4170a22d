"""The admin listener: the admin API and the home-facing SCIM endpoint."""
