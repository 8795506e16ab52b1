"""BitNet b1.58 conversion: quantisers, BitLinear, lambda warmup, saliency curriculum, SubLN, export."""

from .bitlinear import BitLinear, bitlinear_modules
from .convert import ConversionSummary, convert_model_to_bitnet
from .export import export_bitnet
from .quant import activation_quant, ternarize, weight_quant
from .saliency import SaliencyBitLinear, SaliencyCurriculum
from .schedule import LambdaController, LambdaWarmup
from .subln import insert_subln

__all__ = [
    "BitLinear",
    "ConversionSummary",
    "LambdaController",
    "LambdaWarmup",
    "SaliencyBitLinear",
    "SaliencyCurriculum",
    "activation_quant",
    "bitlinear_modules",
    "convert_model_to_bitnet",
    "export_bitnet",
    "insert_subln",
    "ternarize",
    "weight_quant",
]
