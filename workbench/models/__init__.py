"""Model registry, device and dtype choice, and the offline tiny model."""
