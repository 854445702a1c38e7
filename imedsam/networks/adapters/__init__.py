"""What adapts a frozen encoder: LoRA on its attention's q and v, and the Frequency Adapter."""

from .frequency import FA_MODES, FrequencyAdapter, frequency_adapters, frequency_image
from .lora import LoRAQKV, add_lora_to_attention, qkv_rows

__all__ = ["FA_MODES", "FrequencyAdapter", "LoRAQKV", "add_lora_to_attention", "frequency_adapters", "frequency_image", "qkv_rows"]
