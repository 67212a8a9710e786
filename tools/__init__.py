"""Repository tools: generators for files committed from other sources (checked by tests)."""
