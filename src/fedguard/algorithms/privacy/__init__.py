"""Differential privacy: mechanisms (DP-FedAvg clipping and noise, distributed Skellam) and accounting."""
