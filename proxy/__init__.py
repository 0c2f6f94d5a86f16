"""squirro-proxy: a local authenticating reverse proxy for the Squirro API."""

__version__ = "0.1.0"
