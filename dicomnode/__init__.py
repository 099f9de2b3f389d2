"""dicomnode: opportunistic osteoporosis screening from routine CT, as a DICOM node."""

__version__ = "0.1.0"
ALGORITHM_NAME = "dicomnode-classical-bmd"
