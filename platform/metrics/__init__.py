"""Training metrics: TensorBoard event files synced to storage, and NVML GPU health."""
