"""fedlpt: low-precision local training for federated learning on Flower."""

__version__ = "0.1.0"
