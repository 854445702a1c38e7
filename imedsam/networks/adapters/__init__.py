"""What adapts frozen SAM parts: LoRA on the encoder's (and the two-way transformer's) q and v, and the Frequency Adapter."""

from .decoder_lora import DecoderLoRA
from .frequency import FA_MODES, FrequencyAdapter, frequency_adapters, frequency_image
from .lora import LoRAQKV, add_lora_to_attention, qkv_rows

__all__ = ["DecoderLoRA", "FA_MODES", "FrequencyAdapter", "LoRAQKV", "add_lora_to_attention", "frequency_adapters", "frequency_image", "qkv_rows"]
