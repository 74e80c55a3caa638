"""The shared DataModules; their Lightning-free generators are in :mod:`neat_lightning.data.generators`."""

from neat_lightning._lazy import lazy_getattr

_EXPORTS = {
    "ByteTextDataModule": "bytes",
    "MathDataModule": "math",
    "ImageDataModule": "grids",
    "QADataModule": "qa",
    "SceneDataModule": "scenes",
    "MultimodalDataModule": "multimodal",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
