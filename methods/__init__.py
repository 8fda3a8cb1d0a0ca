"""Long-context methods beside Temp-LoRA, one paper per file."""
