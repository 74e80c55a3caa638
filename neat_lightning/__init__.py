"""neat_lightning: PyTorch Lightning research models on bytes — ByteLM (BLT), VQVAE (MVoT), LatticeNetwork, NeatModel."""

__version__ = "0.1.0"
