"""Collectives with autograd (all-gather whose backward is a reduce-scatter, ring exchange)."""
