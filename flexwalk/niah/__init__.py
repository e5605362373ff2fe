"""Needle-in-a-haystack accuracy harness: RULER-format data, evaluation runner and comparison reports."""
