"""A lean transcription engine: static (latent) caches, precomputed logit rules, batched long-form."""
