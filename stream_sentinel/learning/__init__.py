"""Models that keep learning: features and training, the loop, the registry, A/B tests."""
