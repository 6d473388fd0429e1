"""LLaVA-1.5 / LLaVA-NeXT on current transformers, with visual token pruning from `script_prune`."""
