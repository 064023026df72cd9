"""mmfast.utils."""
