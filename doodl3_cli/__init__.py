"""doodl3: the global dynamics of neural-network training, extracted from checkpoints."""

__version__ = "0.1.0"
