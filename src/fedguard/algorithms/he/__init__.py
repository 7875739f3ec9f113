"""Homomorphic encryption's math for aggregation: parameters, encryption, homomorphic sums (TenSEAL)."""
