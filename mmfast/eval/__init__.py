"""mmfast.eval."""
