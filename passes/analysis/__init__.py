"""Analysis passes: read a graph, return records (nothing is rewritten)."""
