"""Benchmarks of celld against nginx and distribution, reported as ratios."""
