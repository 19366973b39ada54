"""Simulations operators run to foresee celld at scale."""
