"""The Kubeflow pipeline that chains BAGEL's four training stages."""
