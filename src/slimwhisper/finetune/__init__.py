"""Recovery fine-tuning of compressed models against a paired, identically trained control."""
