"""medvol: a MONAI-based volumetric pipeline with nnU-Net-style preprocessing.

Array convention inside the library: ``(C, X, Y, Z)``, voxel axes in the order nibabel
gives them for the source file, with a 4x4 RAS affine alongside; spacing in mm in that
same axis order.
"""

__version__ = "0.1.0"
