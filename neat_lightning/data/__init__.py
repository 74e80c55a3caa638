"""The shared DataModules and their (Lightning-free) generators."""

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
