"""A self-hosted stand-in for the Globus Compute web service (demo and tests only)."""
