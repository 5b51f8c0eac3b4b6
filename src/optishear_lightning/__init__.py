"""optishear-lightning: adaptive post-training pruning of LLMs."""
