"""The HU volume with exact patient geometry that every analysis works on.

Conventions (fixed; every module relies on them):

* ``data`` is a float32 array indexed ``[k, j, i]``: ``k`` = slice, ``j`` = row, ``i`` = column.
* ``affine`` is a 4x4 matrix mapping ``(i, j, k, 1)`` (column, row, slice) to DICOM patient coordinates
  **LPS** in mm (x grows to the patient's Left, y to Posterior, z to Superior). Column 0 of the affine is
  the DICOM row direction cosine times the column spacing (``PixelSpacing[1]``), column 1 the column
  direction cosine times the row spacing (``PixelSpacing[0]``), column 2 the slice normal times the slice
  spacing, column 3 the position of voxel (0, 0, 0) (``ImagePositionPatient`` of the first slice).
* NIfTI input is converted from RAS to LPS on load; ``roi_centroid_lps_mm`` is always LPS.
* ``canonical()`` returns a copy flipped/permuted (no resampling) so that i -> L, j -> P, k -> S as closely
  as the acquisition allows; analysis runs on that and maps results back with the affine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class Volume:
    data: FloatArray
    affine: npt.NDArray[np.float64]
    #: Series-level header values (DICOM keywords -> plain values), e.g. Modality, KVP, ConvolutionKernel,
    #: ContrastBolusAgent, PatientAge, PatientSex, StudyInstanceUID, SeriesInstanceUID. Empty for NIfTI.
    header: Mapping[str, Any] = field(default_factory=dict)
    #: SOP Instance UID of each slice k (for SR references); None for NIfTI or unknown.
    slice_sop_instance_uids: tuple[str | None, ...] = ()
    #: Frame number of each slice k for a multi-frame object (1-based); None for single-frame.
    slice_frame_numbers: tuple[int | None, ...] = ()
    #: Where it came from (paths), for messages only.
    source: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.data.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along i (columns), j (rows), k (slices)."""
        a = self.affine[:3, :3]
        return (
            float(np.linalg.norm(a[:, 0])),
            float(np.linalg.norm(a[:, 1])),
            float(np.linalg.norm(a[:, 2])),
        )

    def index_to_lps(self, ijk: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (..., 3) voxel indices (i, j, k) to LPS mm."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (..., 3) LPS mm to fractional voxel indices (i, j, k)."""
        p = np.asarray(xyz, dtype=np.float64)
        inv: npt.NDArray[np.float64] = np.asarray(np.linalg.inv(self.affine), dtype=np.float64)
        return p @ inv[:3, :3].T + inv[:3, 3]

    def canonical(self) -> Volume:
        """Flip/permute axes (no resampling) so that i -> L, j -> P, k -> S as closely as possible."""
        a = self.affine[:3, :3]
        # for each output axis (L, P, S) pick the input axis whose direction is most aligned with it
        dirs = a / np.linalg.norm(a, axis=0)
        order: list[int] = []
        for world_axis in range(3):
            cands = [ax for ax in range(3) if ax not in order]
            order.append(max(cands, key=lambda ax: abs(dirs[world_axis, ax])))
        # order[w] = voxel axis (in i,j,k terms) that maps to world axis w
        data = self.data  # [k, j, i]
        # transpose data into [k', j', i'] where i' = order[0], j' = order[1], k' = order[2]
        np_axis = {0: 2, 1: 1, 2: 0}  # voxel axis -> numpy axis
        data = np.transpose(data, (np_axis[order[2]], np_axis[order[1]], np_axis[order[0]]))
        new_aff = np.eye(4)
        new_aff[:3, 0] = self.affine[:3, order[0]]
        new_aff[:3, 1] = self.affine[:3, order[1]]
        new_aff[:3, 2] = self.affine[:3, order[2]]
        new_aff[:3, 3] = self.affine[:3, 3]
        sop = self.slice_sop_instance_uids
        frames = self.slice_frame_numbers
        if order[2] != 2:  # slices no longer correspond to source images
            sop, frames = (), ()
        # flip axes that point the wrong way
        for w in range(3):
            if new_aff[w, w] < 0:
                n = data.shape[2 - w]
                data = np.flip(data, axis=2 - w)
                new_aff[:3, 3] = new_aff[:3, 3] + new_aff[:3, w] * (n - 1)
                new_aff[:3, w] = -new_aff[:3, w]
                if w == 2:
                    sop = tuple(reversed(sop))
                    frames = tuple(reversed(frames))
        return replace(
            self,
            data=np.ascontiguousarray(data),
            affine=new_aff,
            slice_sop_instance_uids=sop,
            slice_frame_numbers=frames,
        )
