"""mmfast.bench."""
