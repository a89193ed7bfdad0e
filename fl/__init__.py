"""The core every other layer shares: configuration, audio frontend, feature store, models, training loops,
metrics, partitions and run directories. It imports nothing above it and runs without Flower or Ray."""
