"""Secure aggregation's math: Shamir sharing, key agreement and masks, fixed-point encoding, neighbour graphs."""
