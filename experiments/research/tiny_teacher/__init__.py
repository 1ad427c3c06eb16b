"""Training and evaluation of the embedded ``tiny`` teacher pipeline."""
