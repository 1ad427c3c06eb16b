"""Hybrid inference on the embedded teacher: the switch-step sweep and the cloud-cost arithmetic."""
