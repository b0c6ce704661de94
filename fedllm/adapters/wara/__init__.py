"""WaRA: a low-rank update in the wavelet domain (`adapter`), on the filter banks of `wavelets`."""
from fedllm.adapters.wara.adapter import WaRA, WaRALinear

__all__ = ["WaRA", "WaRALinear"]
