"""dicomnode: opportunistic osteoporosis screening from routine CT, as a DICOM node."""

__version__ = "0.1.0"
ALGORITHM_NAME = "dicomnode-classical-bmd"
#: Erosion (mm) from the vertebral-body surface to the trabecular ROI (cortex and partial volume excluded;
#: TotalSegmentator's spine report erodes 4 mm). The one default: ``analysis.erosion_mm`` of the settings and
#: ``dicomnode.bmd.BmdOptions.erosion_mm`` both use it.
DEFAULT_EROSION_MM = 4.0
