"""Lightning callbacks, each usable in any Lightning project. They reach modules only through
:mod:`neat_lightning.protocols` and raise ``TypeError`` at ``setup`` on a module that lacks the protocol."""

from neat_lightning._lazy import lazy_getattr

_EXPORTS = {
    "DecoderBLEUMonitor": "bleu_monitor",
    "PlasticityStages": "plasticity_stages",
    "SleepWakeConsolidation": "sleep_wake",
    "MemoryCleanup": "memory_cleanup",
    "ComponentSchedule": "component_schedule",
    "LoRAFinalStage": "lora_final_stage",
    "ProgressiveScaling": "progressive_scaling",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
