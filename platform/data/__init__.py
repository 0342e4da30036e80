"""Interleaved image-text data: source readers, tar shards with manifests,
streaming through fsspec, mixing, packing and exact resume."""
