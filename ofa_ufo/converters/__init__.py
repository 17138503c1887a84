"""Converters from other OFA checkpoint formats into `OFAUFOForConditionalGeneration`."""

from ofa_ufo.converters.hf_port import (
    config_from_hf_port,
    convert_hf_port_checkpoint,
    convert_hf_port_state_dict,
    load_converted_state_dict,
)

__all__ = [
    "config_from_hf_port",
    "convert_hf_port_checkpoint",
    "convert_hf_port_state_dict",
    "load_converted_state_dict",
]
