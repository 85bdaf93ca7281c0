"""Experiments on top of avalanche_si: benchmark streams, published protocols, reports."""
