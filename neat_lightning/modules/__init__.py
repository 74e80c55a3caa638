"""LightningModules. Each is importable on its own: ``from neat_lightning.modules import ByteLM``."""

from neat_lightning._lazy import lazy_getattr

_EXPORTS = {
    "ByteLM": "byte_lm",
    "VQVAE": "vqvae",
    "LatticeNetwork": "lattice",
    "NeatModel": "neat",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
