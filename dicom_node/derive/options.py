"""How derived series are identified, labelled and encoded (from ``[derived]``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import __version__
from dicom_node.config import DerivedConfig

#: Defaults come from ``[derived]`` (one definition, in :class:`DerivedConfig`).
_DEFAULTS = DerivedConfig()

@dataclass(frozen=True)
class DerivationOptions:
    """How derived series are identified, labelled and encoded.

    Attributes
    ----------
    uid_root
        UID root for new UIDs; empty: the UUID-derived ``2.25.<integer>`` form.
    series_number_offset
        Added to the source Series Number.
    series_description_prefix
        Template put before the source Series Description; ``{scale}`` and ``{mode}`` are filled.
    manufacturer
        Manufacturer of the srnode processing equipment item.
    software_version
        srnode version (Software Versions of the processing equipment item).
    description_suffix
        Appended to the Series Description (e.g. ``" (CHECK)"`` from the safety gate); it always
        survives truncation to 64 characters.
    transfer_syntax
        Output transfer syntax UID: explicit (default) or implicit VR little endian, deflated, RLE
        Lossless or JPEG 2000 Lossless.
    now
        Time of the derivation (Contribution DateTime, instance creation); ``None``: the clock.
    institution_name
        Institution Name of the processing equipment item (empty: left out).
    mode, scale
        The processing done; ``None``: inferred from the result's geometry.
    """

    uid_root: str = _DEFAULTS.uid_root
    series_number_offset: int = _DEFAULTS.series_number_offset
    series_description_prefix: str = _DEFAULTS.series_description_prefix
    manufacturer: str = _DEFAULTS.manufacturer
    software_version: str = __version__
    description_suffix: str = ""
    transfer_syntax: str = ExplicitVRLittleEndian
    now: datetime | None = None
    institution_name: str = _DEFAULTS.institution_name
    mode: str | None = None
    scale: int | None = None

    @classmethod
    def from_config(
        cls,
        derived: DerivedConfig,
        software_version: str,
        *,
        transfer_syntax: str = ExplicitVRLittleEndian,
        description_suffix: str = "",
        now: datetime | None = None,
        mode: str | None = None,
        scale: int | None = None,
        interpolated: bool = False,
    ) -> DerivationOptions:
        """Build options from the ``[derived]`` configuration section.

        Parameters
        ----------
        derived
            The ``[derived]`` section (UID root, series number offset, description prefix,
            manufacturer, institution name).
        software_version
            srnode version.
        transfer_syntax, description_suffix, now, mode, scale
            As the attributes of the same names.
        interpolated
            The engine fell back to interpolation: the series is labelled with
            ``interpolation_description_prefix`` instead of the SR prefix.
        """
        return cls(
            uid_root=derived.uid_root,
            series_number_offset=derived.series_number_offset,
            series_description_prefix=(derived.interpolation_description_prefix if interpolated
                                       else derived.series_description_prefix),
            manufacturer=derived.manufacturer,
            software_version=software_version,
            description_suffix=description_suffix,
            transfer_syntax=transfer_syntax,
            now=now,
            institution_name=derived.institution_name,
            mode=mode,
            scale=scale,
        )
