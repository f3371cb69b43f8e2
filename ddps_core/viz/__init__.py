"""Pictures: colourised label maps, side-by-side overlays, grids. All PNG writes are atomic."""

from ddps_core.viz.palette import colorize, palette
from ddps_core.viz.pictures import grid, overlay, save_png, triptych

__all__ = ["colorize", "grid", "overlay", "palette", "save_png", "triptych"]
