"""srnode package."""
