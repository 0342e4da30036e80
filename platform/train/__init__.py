"""The distributed trainer of `bagel train`: meshes, parallelisation, optimizer, EMA and the loop."""
