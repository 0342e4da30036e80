"""Kubernetes job specs of a training stage: Kubeflow Trainer v2 TrainJob (default) or v1 PyTorchJob."""
