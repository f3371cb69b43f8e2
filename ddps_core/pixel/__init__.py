"""pixel."""
