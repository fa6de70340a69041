"""srnode test suite."""
