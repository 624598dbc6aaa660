"""Datasets (PASCAL-5i, COCO-20i, generated data), episodes, manifests and protocols."""
