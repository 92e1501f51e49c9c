"""Shared image operations and primitives used by attacks and defenses alike (imports only torch, numpy, PIL):
budgets in pixel units, per-sample and per-step random streams, the LGT rectangle sampler and luma, 8-bit
quantisation and re-encoding of outputs."""

from advreid.ops.budget import STEP_RULES, eps_label, parse_eps, parse_eps_list, parse_number, px, resolve_steps
from advreid.ops.lgt import (
    LUMA_MODES,
    RECT_MODES,
    check_lgt_params,
    lgt,
    linear_luma,
    local_grayscale,
    luma,
    pil_luma,
    rect_masks,
    rects_from_uniform,
    sample_lgt_rects,
)
from advreid.ops.output import (
    QUANTIZE_MODES,
    SEED_COMPAT,
    finalize,
    output_name,
    parse_format,
    quantize,
    quantize_within,
    reencode,
    save_images,
    to_uint8,
)
from advreid.ops.random import batch_generator, per_sample_rand, sample_generators

__all__ = [
    "LUMA_MODES", "QUANTIZE_MODES", "RECT_MODES", "SEED_COMPAT", "STEP_RULES", "batch_generator", "check_lgt_params",
    "eps_label", "finalize", "lgt", "linear_luma", "local_grayscale", "luma", "output_name", "parse_eps",
    "parse_eps_list", "parse_format", "parse_number", "per_sample_rand", "pil_luma", "px", "quantize",
    "quantize_within", "rect_masks", "rects_from_uniform", "reencode", "resolve_steps", "sample_generators",
    "sample_lgt_rects", "save_images", "to_uint8",
]
