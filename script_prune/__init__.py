"""Script: graph-structured and query-conditioned visual token pruning (pure torch)."""
