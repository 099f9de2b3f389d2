"""Secondary-capture (SC IOD, RGB) wrapping of rendered overlay images, in the source study."""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import __version__
from dicomnode.report.patient import sanitized_source
from dicomnode.report.render import RenderedImage
from dicomnode.report.uids import UidPolicy

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "dicomnode BMD overlay"
#: Defined term of CID 4031 for the region shown; dciodvfy needs BodyPartExamined (or Laterality) on an SC.
BODY_PART = "LSPINE"


def build_sc(
    image: RenderedImage,
    ref_dataset: Dataset,
    uids: UidPolicy,
    instance_number: int,
    *,
    series_number: int = SC_SERIES_NUMBER,
    series_instance_uid: str | None = None,
    disclaimer: str | None = None,
) -> hd.sc.SCImage:
    """Wrap one rendered overlay as an RGB secondary capture in the study of ``ref_dataset``.

    Parameters
    ----------
    image
        The rendered overlay.
    ref_dataset
        A source CT dataset: patient and study modules are copied from it (headers suffice; invalid values
        are left empty: ``report.patient``).
    uids
        UID policy; the instance UID derives from the image name (``sc-instance-<name>``).
    instance_number, series_number
        Written as given.
    series_instance_uid
        The overlay series of this analysis, the same for all its overlays (``write_outputs`` chooses it
        once); default ``uids.uid("sc-series")``, which is random without a job key.
    disclaimer
        Also written into ImageComments (it is burned into the pixels as well).
    """
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sanitized_source(ref_dataset),
        pixel_array=image.rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid or uids.uid("sc-series"),
        series_number=series_number,
        sop_instance_uid=uids.uid(f"sc-instance-{image.name}"),
        instance_number=instance_number,
        manufacturer="dicomnode",
        pixel_spacing=image.pixel_spacing_mm,  # type: ignore[arg-type]  # highdicom hints int, means mm
        patient_orientation=image.patient_orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ConversionType = "WSD"  # rendered by software ("workstation"), not digitised from a video interface
    sc.BodyPartExamined = BODY_PART
    sc.BurnedInAnnotation = "YES"  # labels and numbers are drawn into the pixels (no patient identifiers)
    sc.SoftwareVersions = f"dicomnode {__version__}"
    sc.DerivationDescription = f"dicomnode BMD overlay: {image.description}"[:1024]
    if disclaimer:
        sc.ImageComments = disclaimer[:10240]
    return sc
