"""Pictures: colourised label maps, side-by-side overlays, grids. All PNG writes are atomic."""

from ddps_core.viz.palette import colorize, palette
from ddps_core.viz.pictures import caption, grid, overlay, save_png, triptych, with_header

__all__ = ["caption", "colorize", "grid", "overlay", "palette", "save_png", "triptych", "with_header"]
