"""The opt-in lossy tier: exploratory branches stored at reduced float precision.

A lossy commit rounds every floating-point array to ``mantissa_bits`` explicit
mantissa bits (``_codecs.round_bits``) right after staging, before anything is
hashed. From there on the rounded values *are* the snapshot: chunk ids, dedup,
the hot tier and restores all see them, and the digest check verifies them
exactly. Predictive and delta objects round their predictions the same way
and store the residual shifted right by the dropped bits, so the precision that
was given up costs no bytes. Relative error per element: at most
``2**-(mantissa_bits + 1)`` for normal numbers (see ``round_bits``).

The main line (branch ``main``) never receives lossy content unless asked:
commits, joins and averages onto it refuse a lossy source without
``allow_main``/``allow_lossy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from qckpt.commit.staging import StagedArray
from qckpt.errors import InvalidInputError
from qckpt.format.codecs import FLOAT_FORMATS, FLOAT_NONE, mantissa_bits, round_bits

MAIN_LINE = "main"


@dataclass(frozen=True)
class LossyTier:
    """Store floats with ``mantissa_bits`` explicit mantissa bits (10 = float16's
    precision, with float32's range). Formats with no more bits than that
    (bfloat16 below 8, float16 below 11) are stored exactly, and so are arrays
    of fewer than ``min_elements`` elements: step counters, loss scales and
    other bookkeeping scalars, where rounding would change behaviour and save
    nothing. ``allow_main`` permits committing to the main line."""

    mantissa_bits: int = 10
    min_elements: int = 1024
    allow_main: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.mantissa_bits, bool) or not isinstance(self.mantissa_bits, int) or not 1 <= self.mantissa_bits <= 51:
            raise InvalidInputError(f"LossyTier.mantissa_bits must be an int from 1 to 51, got {self.mantissa_bits!r}")
        if isinstance(self.min_elements, bool) or not isinstance(self.min_elements, int) or self.min_elements < 1:
            raise InvalidInputError(f"LossyTier.min_elements must be a positive int, got {self.min_elements!r}")

    @property
    def relative_error(self) -> float:
        """The bound on |stored - original| / |original| for normal float numbers."""
        return 2.0 ** -(self.mantissa_bits + 1)

    def annotation(self) -> dict[str, Any]:
        return {"mantissa_bits": self.mantissa_bits, "relative_error": self.relative_error, "min_elements": self.min_elements}


def quantize(staged: Sequence[StagedArray], tier: LossyTier) -> list[StagedArray]:
    """Round the floating-point staged arrays the tier covers, in place (the buffers
    belong to the repository); returns the arrays with ``dropped`` recorded."""
    out = []
    for array in staged:
        fmt = FLOAT_FORMATS.get(array.dtype, FLOAT_NONE)
        dropped = max(0, mantissa_bits(fmt) - tier.mantissa_bits)
        if dropped and array.data.size >= tier.min_elements * array.itemsize:
            array.data[:] = round_bits(array.data, fmt, dropped)
            array = replace(array, dropped=dropped)
        out.append(array)
    return out


def check_main_line(branch: str, lossy: dict[str, Any] | None, allowed: bool, what: str) -> None:
    """Refuse lossy content on the main line unless the caller allowed it."""
    if lossy is not None and branch == MAIN_LINE and not allowed:
        raise InvalidInputError(
            f"{what} would put lossy content ({lossy.get('mantissa_bits')} mantissa bits) on the main line "
            f"{MAIN_LINE!r}; use another branch or allow it explicitly"
        )
