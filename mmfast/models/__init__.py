"""mmfast.models."""
