"""Hand-written, parameterised Triton kernel templates (one per file)."""
