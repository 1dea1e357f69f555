"""Shared quantization core: one entry point, quantize_model(model, Recipe(...)), over schemes,
observers, fake-quant ops, quantized modules, calibration, algorithms, packing and checkpoints.
See each module's docstring for what it owns."""
from .calibrate import calibrate
from .checkpoint import float_size_bytes, load_quantized, quantized_size_bytes, save_quantized
from .fake_quant import dequantize, fake_quantize, lsq_fake_quantize, quantize
from .modules import QuantEmbedding, Quantizer, QuantLinear, quant_modules, quantize_linears
from .observers import OBSERVERS, make_observer
from .packing import pack, unpack
from .recipe import Recipe, quantize_model
from .scheme import QScheme, qparams_from_range

__all__ = ["Recipe", "quantize_model", "QScheme", "qparams_from_range", "quantize", "dequantize", "fake_quantize", "lsq_fake_quantize",
           "OBSERVERS", "make_observer", "Quantizer", "QuantLinear", "QuantEmbedding", "quantize_linears", "quant_modules",
           "calibrate", "pack", "unpack", "save_quantized", "load_quantized", "quantized_size_bytes",
           "float_size_bytes"]
