"""I-MedSAM: implicit medical image segmentation with Segment Anything, for MONAI."""

__version__ = "0.1.0"
