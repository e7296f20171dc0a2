"""crt package."""
