"""Federated optimizers as pure functions: weighted means, server optimizers, SCAFFOLD, FedDyn,
FedNova, Newton steps."""
