"""Types every stage shares: a decoded frame's metadata and the ultrasound regions it carries."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class UltrasoundRegion:
    """One item of the Sequence of Ultrasound Regions (0018,6011), PS3.3 C.8.5.5.

    Coordinates are pixel positions, inclusive, as the standard defines them
    (Region Location Min/Max X0, Y0, X1, Y1).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    #: Region Spatial Format (0018,6012): 0 none, 1 2D, 2 M-mode, 3 spectral, 4 waveform, ...
    spatial_format: int = 0
    #: Region Data Type (0018,6014): 1 tissue, 2 colour flow, 3 PW Doppler, ...
    data_type: int = 0
    #: Physical Units X/Y Direction (0018,6024/6026): 3 = cm.
    units_x: int = 0
    units_y: int = 0
    #: Physical Delta X/Y (0018,602C/602E): size of one pixel in ``units_x``/``units_y``.
    delta_x: float | None = None
    delta_y: float | None = None
    #: Region Flags (0018,6016), C.8.5.5.1.3: bit 0 priority, bit 1 scaling protection, ...
    flags: int = 0
    #: Reference Pixel X0/Y0 (0018,6020/6022): origin of the physical axes, relative to x0/y0.
    reference_x0: int | None = None
    reference_y0: int | None = None

    @property
    def is_image(self) -> bool:
        """A 2-D tissue image region (not M-mode, Doppler or a waveform strip)."""
        return self.spatial_format == 1

    def mm_per_pixel(self) -> tuple[float, float] | None:
        """Pixel size in millimetres, when the region is calibrated in centimetres."""
        if self.units_x == 3 and self.units_y == 3 and self.delta_x and self.delta_y:
            return abs(self.delta_x) * 10.0, abs(self.delta_y) * 10.0
        return None

    def within(self, rows: int, columns: int) -> bool:
        """The region lies inside a ``rows`` x ``columns`` pixel grid.

        Some files were resized after capture without updating their regions (pydicom's
        ``examples_palette.dcm``); their coordinates and pixel sizes cannot be trusted.
        """
        return 0 <= self.x0 <= self.x1 < columns and 0 <= self.y0 <= self.y1 < rows


@dataclass(frozen=True, slots=True)
class FrameMeta:
    """What the stages after decode need to know about a frame (no patient identifiers)."""

    sop_instance_uid: str
    frame_index: int
    number_of_frames: int
    rows: int
    columns: int
    #: Photometric Interpretation as stored (decode always outputs RGB).
    photometric_interpretation: str
    manufacturer: str = ""
    model_name: str = ""
    #: Burned In Annotation (0028,0301) == "YES": the frame must be scrubbed before it leaves.
    burned_in_annotation: bool = True
    regions: tuple[UltrasoundRegion, ...] = field(default=())
    #: Transfer Syntax UID (0002,0010) the pixels were stored in.
    transfer_syntax_uid: str = ""
    #: Lossy Image Compression (0028,2110) == "01", or a lossy transfer syntax: pixels are not
    #: the scanner's originals (reports say so, PS3.3 C.7.6.1.1.5).
    lossy: bool = False
    #: Frame Time (0018,1063) in ms for cines (or 1000 / Cine Rate); ``None`` for still images.
    frame_time_ms: float | None = None

    def image_region(self) -> UltrasoundRegion | None:
        """The largest 2-D tissue region, if the header declares any."""
        images = [r for r in self.regions if r.is_image]
        if not images:
            return None
        return max(images, key=lambda r: (r.x1 - r.x0 + 1) * (r.y1 - r.y0 + 1))
