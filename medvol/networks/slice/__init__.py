"""2D (slice) networks."""
