"""Active labelling: which pool images to label next (``ddps suggest``), with the teacher's
pre-labels to correct, and the corrected masks back into the training split (``ddps data
add-labels``). docs/active.md describes the loop."""

from ddps_core.active.add_labels import add_labels, decode_mask
from ddps_core.active.select import Pick, diverse_uncertain, pooled_descriptors
from ddps_core.active.suggest import suggest

__all__ = ["Pick", "add_labels", "decode_mask", "diverse_uncertain", "pooled_descriptors", "suggest"]
