"""The model layer: the Re-ID ViT, prunable attention, dynamic-token blocks, plans (as data) and
pruned-model files, foreign checkpoint import. Imports nothing else of amg but amg.data."""
