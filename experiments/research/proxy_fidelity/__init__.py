"""Rank fidelity of the quality proxy: does a short distillation rank candidates the way a long one does?"""
