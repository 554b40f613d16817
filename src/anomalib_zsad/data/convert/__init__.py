"""Converters from the layouts that data sets' owners publish into the MVTec AD layout.

For the sets of the zero-shot papers that anomalib 2.7 has no datamodule for::

    python -m anomalib_zsad.data.convert <name> <downloaded folder> <out>     # e.g. sdd, headct, kvasir
    python -m anomalib_zsad.data.convert --list

The output is read by :class:`~anomalib_zsad.data.MVTecLayout` (masks optional) and, where it has
masks, by anomalib's ``MVTecAD``; it is a source or a target of
:class:`~anomalib_zsad.data.CrossDataset` and of the benchmark like any other set. Conversion is
atomic (a temporary folder renamed when complete), refuses a folder in another layout with one
message that says what was expected, and imports no anomalib (it is quick to start).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib_zsad.data.convert import industrial, medical
from anomalib_zsad.data.convert._writer import MANIFEST, LayoutError, Writer, convert_atomically
from anomalib_zsad.data.errors import DatasetError

__all__ = ["CONVERTERS", "MANIFEST", "Converter", "LayoutError", "convert"]


@dataclass(frozen=True)
class Converter:
    """One published layout: its converter function, the layout it expects and what it writes."""

    name: str
    title: str
    function: Callable[..., None]
    layout: str
    masks: str  # "yes", "no" (image labels only)
    normals: bool  # whether the test set has normal images

    @property
    def options(self) -> dict[str, Any]:
        """The converter's options and their defaults (keyword arguments after ``writer``)."""
        parameters = list(inspect.signature(self.function).parameters.values())[2:]
        return {p.name: p.default for p in parameters}

    @property
    def summary(self) -> str:
        """The first paragraph of the function's documentation, on one line."""
        return " ".join((self.function.__doc__ or "").strip().split("\n\n")[0].split())


def _entries() -> list[Converter]:
    i, m = industrial, medical
    return [
        Converter("sdd", "SDD (KolektorSDD)", i.convert_sdd, i.SDD_LAYOUT, "yes", True),
        Converter("ksdd2", "KSDD2 (KolektorSDD2)", i.convert_ksdd2, i.KSDD2_LAYOUT, "yes", True),
        Converter("dagm", "DAGM 2007", i.convert_dagm, i.DAGM_LAYOUT, "yes", True),
        Converter("dtd", "DTD-Synthetic", i.convert_dtd, i.DTD_LAYOUT, "yes", True),
        Converter("headct", "HeadCT", m.convert_headct, m.HEADCT_LAYOUT, "no", True),
        Converter("brainmri", "BrainMRI", m.convert_brainmri, m.YES_NO_LAYOUT.format(name="BrainMRI"), "no", True),
        Converter("br35h", "Br35H", m.convert_br35h, m.YES_NO_LAYOUT.format(name="Br35H"), "no", True),
        Converter("covid19", "COVID-19 Radiography", m.convert_covid19, m.COVID_LAYOUT, "no", True),
        Converter("isic", "ISIC 2016", m.convert_isic, m.ISIC_LAYOUT, "yes", False),
        Converter("clinicdb", "CVC-ClinicDB", m.convert_clinicdb, m.CLINICDB_LAYOUT, "yes", False),
        Converter("colondb", "CVC-ColonDB", m.convert_colondb, m.COLONDB_LAYOUT, "yes", False),
        Converter("kvasir", "Kvasir-SEG", m.convert_kvasir, m.KVASIR_LAYOUT, "yes", False),
        Converter("endo", "Endo (EndoTect 2020)", m.convert_endo, m.ENDO_LAYOUT, "yes", False),
        Converter("tn3k", "TN3K", m.convert_tn3k, m.TN3K_LAYOUT, "yes", False),
    ]


CONVERTERS: dict[str, Converter] = {c.name: c for c in _entries()}


def convert(name: str, source: str | Path, out: str | Path, overwrite: bool = False, **options: Any) -> Path:  # noqa: ANN401
    """Convert the download at ``source`` with converter ``name`` into MVTec AD layout at ``out``.

    ``options`` are the converter's own (e.g. ``pieces=3`` for ``sdd``, ``balanced=True`` for ``ksdd2``,
    ``category=...`` for any): see ``CONVERTERS[name].options``. Returns ``out`` (absolute).
    Raises :class:`~anomalib_zsad.data.DatasetError` (:class:`LayoutError` for a folder in another layout).
    """
    converter = CONVERTERS.get(name.lower())
    if converter is None:
        msg = f"Unknown converter '{name}'; available: {', '.join(CONVERTERS)}."
        raise DatasetError(msg)
    unknown = sorted(set(options) - set(converter.options))
    if unknown:
        msg = f"Converter '{converter.name}' has no option(s) {unknown}; its options: {converter.options}."
        raise DatasetError(msg)

    def build(folder: Path, writer: Writer) -> None:
        converter.function(folder, writer, **options)

    return convert_atomically(converter.name, source, out, build, {**converter.options, **options}, overwrite)
