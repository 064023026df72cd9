"""mmfast.data."""
