"""2D (slice) segmentation networks."""
