"""The training images: scanning a dataset folder into checked records and problems with its train/validation split
(dataset), opening and converting images (images), aspect-ratio buckets (buckets), copying uploads into a new
dataset (importing) and the on-disk cache of encoded latents and caption embeddings (feature_cache).
"""
