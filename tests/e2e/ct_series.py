"""A synthetic abdominal CT series written as DICOM, for the browser test: the store and the viewer get real
CT Image Storage instances with consistent geometry, and the test knows where the organ is.

The phantom is an elliptical body (soft tissue at 40 HU inside fat at -100 HU, air outside) with one
contrast-enhanced, kidney-like organ at 180 HU: an ellipsoid sheared along the slices (its centre moves
``drift`` columns per slice), so each slice's cross-section is different and a mask placed on the wrong
slice, or read from the wrong one, does not fit.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RESCALE_INTERCEPT = -1024.0


@dataclass(frozen=True)
class Phantom:
    """The organ in voxel indices: centre ``(i, j, k)`` and semi-axes ``(ri, rj, rk)`` of the ellipsoid, whose
    centre moves ``drift`` columns per slice; ``i`` is the column, ``j`` the row, ``k`` the slice."""

    shape: tuple[int, int, int] = (192, 160, 12)  # columns, rows, slices
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)  # mm: column, row, slice
    centre: tuple[float, float, float] = (112.0, 74.0, 5.5)
    radii: tuple[float, float, float] = (22.0, 16.0, 7.0)
    drift: float = 6.0

    def organ(self) -> np.ndarray:
        """``(I, J, K)`` boolean organ mask."""
        i, j, k = np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij")
        (ci, cj, ck), (ri, rj, rk) = self.centre, self.radii
        ci = ci + self.drift * (k - ck)
        return ((i - ci) / ri) ** 2 + ((j - cj) / rj) ** 2 + ((k - ck) / rk) ** 2 <= 1.0

    def box_on_slice(self, k: int) -> tuple[int, int, int, int]:
        """``(i0, j0, i1, j1)`` inclusive extent of the organ on slice ``k``."""
        ii, jj = np.nonzero(self.organ()[:, :, k])
        return int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())

    def hounsfield(self, seed: int = 0) -> np.ndarray:
        """``(I, J, K)`` int16 HU volume with scanner-like noise."""
        columns, rows, _ = self.shape
        i, j = np.meshgrid(np.arange(columns), np.arange(rows), indexing="ij")
        body = ((i - columns / 2) / (0.46 * columns)) ** 2 + ((j - rows / 2) / (0.44 * rows)) ** 2
        plane = np.where(body <= 1.0, -100.0, -1000.0)
        plane = np.where(body <= 0.8, 40.0, plane)
        volume = np.repeat(plane[:, :, None], self.shape[2], axis=2)
        volume[self.organ()] = 180.0
        volume += np.random.default_rng(seed).normal(0.0, 8.0, volume.shape)
        return np.round(volume).astype(np.int16)


def ct_series(phantom: Phantom = Phantom(), patient_id: str = "IMEDSAM-E2E") -> list[Dataset]:
    """One DICOM dataset per slice, axial, slice ``k`` at z = ``k * spacing``; pixel rows are ``j``."""
    volume = phantom.hounsfield()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    today = datetime.date.today().strftime("%Y%m%d")
    columns, rows, slices = phantom.shape
    datasets = []
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)  # a Part 10 file, as a scanner sends
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = "Phantom^Kidney", patient_id, "O", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "IMEDSAME2E", ""
        ds.StudyDescription, ds.SeriesDescription = "I-MedSAM browser test", "Synthetic abdomen"
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "I-MedSAM tests", "ABDOMEN"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * phantom.spacing[2])]
        ds.SliceLocation = float(k * phantom.spacing[2])
        ds.PixelSpacing = [phantom.spacing[1], phantom.spacing[0]]  # row spacing, column spacing
        ds.SliceThickness = phantom.spacing[2]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, 1.0, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        stored = (volume[:, :, k].T.astype(np.int32) - int(RESCALE_INTERCEPT)).astype(np.int16)  # rows = j
        ds.PixelData = stored.tobytes()
        datasets.append(ds)
    return datasets
