"""DICOM second-reader node.

Receives studies over DICOM (PS3.4 Storage Service Class), runs an ONNX model on each complete
series, and returns the findings as DICOM Segmentation (PS3.3 A.51) and Comprehensive 3D SR with a
TID 1500 Measurement Report (PS3.16), marked as AI-generated and needing review. Not a medical device.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
