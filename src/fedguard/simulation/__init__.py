"""Simulation only: the in-process transport, simulated attacks and dropout injection."""
