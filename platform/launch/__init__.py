"""`bagel launch`: run a stage as a Kubernetes job or with torchrun locally, classify its end, resubmit after preemption."""
