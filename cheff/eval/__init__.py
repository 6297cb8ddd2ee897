"""Evaluation of the Cheff models against the paper's tables (``cheff eval``).

``metrics`` holds the per-image MSE / PSNR / SSIM; ``recon`` the autoencoder's reconstruction
evaluation on a MaCheX held-out set (Table 2). See docs/cheff/evaluation.md.
"""

from __future__ import annotations

from cheff.eval.metrics import image_metrics, mse, psnr, ssim, summarize
from cheff.eval.recon import (
    DEFAULT_OPTIONS,
    PAPER_TABLE2,
    HoldoutChoiceError,
    ReconOptions,
    ReconResult,
    WorstImage,
    evaluate_recon,
    resolve_holdout,
    write_json,
    write_outputs,
    write_rows,
    write_worst_png,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "PAPER_TABLE2",
    "HoldoutChoiceError",
    "ReconOptions",
    "ReconResult",
    "WorstImage",
    "evaluate_recon",
    "image_metrics",
    "mse",
    "psnr",
    "resolve_holdout",
    "ssim",
    "summarize",
    "write_json",
    "write_outputs",
    "write_rows",
    "write_worst_png",
]
