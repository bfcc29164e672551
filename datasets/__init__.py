"""Dataset adapters (public layouts -> raw layout) and the built-in demo data."""
