"""Analysis: describe masks and probe what their entries do, without training.

* `peft_safety.analysis.overlap` -- IoU matrices, stability across data sets or seeds, per-layer distributions;
* `peft_safety.analysis.plots` -- heat maps, IoU matrices and the safety-layer angle gap as PNG files;
* `peft_safety.analysis.probes` -- reversible in-place edits at a mask (`zeroed`, `scaled`, `noised`,
  `restored_from`), the permanent `rewind_`, and `mask_drift`.

This stage reads masks and models; it imports only `peft_safety.mask` (and the standard library, torch), so scorers
may use its probes.
"""

from .overlap import LayerDistribution, StabilityReport, iou_matrix, layer_distribution, overlap_report, stability
from .plots import plot_angle_gap, plot_iou_matrix, plot_layer_heatmap
from .probes import mask_drift, noised, restored_from, rewind_, scaled, zeroed

__all__ = [
    "LayerDistribution",
    "StabilityReport",
    "iou_matrix",
    "layer_distribution",
    "mask_drift",
    "noised",
    "overlap_report",
    "plot_angle_gap",
    "plot_iou_matrix",
    "plot_layer_heatmap",
    "restored_from",
    "rewind_",
    "scaled",
    "stability",
    "zeroed",
]
