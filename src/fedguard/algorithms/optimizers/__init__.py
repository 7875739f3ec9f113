"""Federated optimizers as pure functions: weighted means, server optimizers, SCAFFOLD, Newton steps."""
