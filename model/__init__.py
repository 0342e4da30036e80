"""BAGEL's Mixture-of-Transformers model: decoder, vision encoder, VAE latents and losses.

This package knows nothing of distributed training or Kubernetes; everything
here runs in one CPU process.
"""
