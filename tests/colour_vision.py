"""How far apart two colours stay for a reader with dichromacy, for the palette tests.

Machado, Oliveira and Fernandes (2009) model protanopia, deuteranopia and tritanopia (severity
1) as a 3 x 3 matrix on linear RGB. The distance between the simulated colours is CIE76 ΔE
(Euclidean in CIELAB, D65): about 2 is barely visible, and thin lines and small markers below
about 10 are hard to tell apart.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import to_rgb

MACHADO = {
    "protanopia": np.array([[0.152286, 1.052583, -0.204868],
                            [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968],
                              [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779],
                            [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}
_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE = _XYZ @ np.ones(3)


def _linear(rgb: np.ndarray) -> np.ndarray:
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def _lab(linear: np.ndarray) -> np.ndarray:
    t = (_XYZ @ linear) / _WHITE
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def delta_e(a: str, b: str, vision: str | None = None) -> float:
    """CIE76 distance between colours ``a`` and ``b`` (any matplotlib colour) as seen with
    ``vision`` (a key of :data:`MACHADO`; None: normal colour vision)."""
    la, lb = (_linear(np.asarray(to_rgb(c))) for c in (a, b))
    if vision is not None:
        la, lb = (np.clip(MACHADO[vision] @ x, 0, 1) for x in (la, lb))
    return float(np.linalg.norm(_lab(la) - _lab(lb)))


def closest_pair(colours: dict[str, str]) -> tuple[float, str, str, str]:
    """The smallest distance between two of ``colours`` under any vision, normal included:
    ``(ΔE, vision, name, other name)``."""
    names = list(colours)
    return min((delta_e(colours[p], colours[q], v), v or "normal", p, q)
               for v in (None, *MACHADO) for i, p in enumerate(names) for q in names[i + 1:])
