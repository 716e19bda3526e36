"""Synthetic frame content: a machine-readable (episode, frame) marker, optionally over texture.

Every synthetic frame carries its own identity. The frame is divided into a fixed grid of
``MARKER_ROWS x MARKER_COLS`` cells that always spans the whole image, whatever its size; each
cell is either dark (bit 0) or light (bit 1). The 24 bits hold the episode index (10 bits), the
frame index (12 bits) and two check bits. Because the grid is defined in fractions of the image,
:func:`read_marker` also reads frames that were resized, and because each cell is read as the mean
luma of its central region, it survives lossy coding (AV1 at crf 30 with 8x8-pixel cells).

With ``texture=True`` a seeded, moving, multi-scale value-noise texture plus a drifting gradient is
added on top of the cells. It makes the video expensive to encode and realistic to decode (motion
for inter prediction, detail for residuals), while the cell means stay far from the threshold.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from framefeed.errors import ConfigError, DecodeError

__all__ = [
    "EPISODE_BITS",
    "FRAME_BITS",
    "MARKER_COLS",
    "MARKER_ROWS",
    "FramePainter",
    "draw_frame",
    "read_marker",
]

MARKER_ROWS = 4
"""Rows of marker cells; the grid always spans the full image height."""
MARKER_COLS = 6
"""Columns of marker cells; the grid always spans the full image width."""
EPISODE_BITS = 10
"""Bits for the episode index: episodes 0..1023 can be marked."""
FRAME_BITS = 12
"""Bits for the frame index inside an episode: frames 0..4095 can be marked."""
_CHECK_BITS = 2
_NUM_BITS = EPISODE_BITS + FRAME_BITS + _CHECK_BITS
assert _NUM_BITS == MARKER_ROWS * MARKER_COLS  # module invariant, not argument validation

_THRESHOLD = 127.5
"""Luma threshold between a dark and a light cell."""
_MARGIN = 24.0
"""A cell whose mean luma is closer than this to the threshold makes the marker unreadable."""
_OCTAVES: tuple[tuple[int, int], ...] = ((2, 3), (4, 8))
"""Texture value-noise octaves as (block size in pixels, peak amplitude in luma levels)."""
_GRADIENT = 20
"""Peak amplitude of the texture's drifting gradient, in luma levels."""
_TEXTURE_AMPLITUDE = sum(weight for _, weight in _OCTAVES) + _GRADIENT
"""Largest absolute luma offset the texture adds to a cell colour."""

# (dark, light) RGB colours per camera index (cycled). All darks have luma < 30, all lights > 200,
# so the cell means stay on their side of the threshold even with the texture added.
_PALETTE: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((24, 24, 24), (232, 232, 232)),
    ((44, 14, 0), (255, 226, 170)),
    ((0, 20, 52), (170, 226, 255)),
    ((12, 40, 12), (214, 255, 200)),
    ((40, 0, 40), (255, 214, 255)),
)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

U8Array = npt.NDArray[np.uint8]


def _edges(size: int, parts: int) -> list[int]:
    """Integer cell boundaries that split ``size`` pixels into ``parts`` near-equal cells."""
    return [(k * size) // parts for k in range(parts + 1)]


def _check_bits(data: list[int]) -> list[int]:
    """Two check bits: inverted parities of the even- and odd-positioned data bits.

    Inverting makes the all-dark and all-light images invalid markers, so a blank or padding frame
    is never read as episode 0, frame 0.
    """
    even = sum(data[0::2]) & 1
    odd = sum(data[1::2]) & 1
    return [1 - even, 1 - odd]


def _encode_bits(episode: int, frame: int) -> list[int]:
    data = [(episode >> (EPISODE_BITS - 1 - k)) & 1 for k in range(EPISODE_BITS)]
    data += [(frame >> (FRAME_BITS - 1 - k)) & 1 for k in range(FRAME_BITS)]
    return data + _check_bits(data)


def _validate_ids(episode: int, frame: int, camera: int) -> None:
    if not 0 <= episode < (1 << EPISODE_BITS):
        raise ConfigError(
            f"episode {episode} cannot be marked: the frame marker holds episodes "
            f"0..{(1 << EPISODE_BITS) - 1}; write fewer episodes"
        )
    if not 0 <= frame < (1 << FRAME_BITS):
        raise ConfigError(
            f"frame {frame} cannot be marked: the frame marker holds frames "
            f"0..{(1 << FRAME_BITS) - 1} per episode; use shorter episodes"
        )
    if camera < 0:
        raise ConfigError(f"camera index must be >= 0, got {camera}")


class FramePainter:
    """Draws the frames of one (episode, camera) pair; the texture is built once and reused.

    :func:`draw_frame` is the stateless entry point. The writer keeps one painter per episode and
    camera so that the texture is generated once per episode rather than once per frame.
    """

    def __init__(
        self, *, episode: int, camera: int, height: int, width: int, texture: bool, seed: int
    ) -> None:
        _validate_ids(episode, 0, camera)
        if height < MARKER_ROWS or width < MARKER_COLS:
            raise ConfigError(
                f"frame size {height}x{width} is smaller than the {MARKER_ROWS}x{MARKER_COLS} "
                "marker grid; use at least 32x48 pixels for video"
            )
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        self.episode = episode
        self.height = height
        self.width = width
        self._row_sizes = np.diff(_edges(height, MARKER_ROWS))
        self._col_sizes = np.diff(_edges(width, MARKER_COLS))
        dark, light = _PALETTE[camera % len(_PALETTE)]
        self._colours = np.array([dark, light], dtype=np.uint8)
        self._texture: _Texture | None = None
        if texture:
            self._texture = _Texture(
                episode=episode, camera=camera, height=height, width=width, seed=seed
            )
            # Row k of the lookup table is the clipped colour for (bit, offset) with
            # k = bit * span + offset + amplitude, so one gather paints the whole frame.
            amp = _TEXTURE_AMPLITUDE
            offsets = np.arange(-amp, amp + 1, dtype=np.int16)
            table = self._colours.astype(np.int16)[:, None, :] + offsets[None, :, None]
            self._lut = np.clip(table, 0, 255).astype(np.uint8).reshape(-1, 3)

    def draw(self, frame: int) -> U8Array:
        """The HWC uint8 RGB image of frame ``frame`` of this painter's episode."""
        _validate_ids(self.episode, frame, 0)
        bits = np.array(_encode_bits(self.episode, frame), dtype=np.int16)
        grid = bits.reshape(MARKER_ROWS, MARKER_COLS)
        cell_bits = np.repeat(np.repeat(grid, self._row_sizes, axis=0), self._col_sizes, axis=1)
        if self._texture is None:
            return np.take(self._colours, cell_bits, axis=0)
        index = self._texture.at(frame)
        index += _TEXTURE_AMPLITUDE
        cell_bits *= 2 * _TEXTURE_AMPLITUDE + 1
        index += cell_bits
        return np.take(self._lut, index, axis=0)


class _Texture:
    """Seeded, tileable, moving texture: blocky value noise at two scales plus a gradient.

    Each octave is a small random grid upsampled by pixel repetition (2x2 and 4x4 blocks) and
    tiled twice in each direction, so a frame's window is a slice. The octaves move with
    different velocities (parallax, so inter prediction has real work to do) and a diagonal
    triangle-wave gradient drifts across the frame. Amplitudes are calibrated so that 640x480
    AV1 (g=2, crf 30, preset 10) decodes at about 240 random-access frames/s on one core with
    libdav1d (decode only, about 1.5 decodes per requested frame). For scale: per-pixel noise
    decodes at about 90/s and the flat frames at over 2,000/s.
    """

    def __init__(self, *, episode: int, camera: int, height: int, width: int, seed: int) -> None:
        rng = np.random.default_rng([seed, episode, camera, height, width])
        self.height = height
        self.width = width
        self._tiles: list[npt.NDArray[np.int16]] = []
        self._velocity: list[tuple[int, int]] = []
        for block, weight in _OCTAVES:
            grid_h = -(-height // block)
            grid_w = -(-width // block)
            grid = rng.integers(-weight, weight + 1, size=(grid_h, grid_w), dtype=np.int16)
            tile = np.repeat(np.repeat(grid, block, axis=0), block, axis=1)
            self._tiles.append(np.tile(tile, (2, 2)))
            vy = int(rng.integers(-3, 4))
            vx = int(rng.integers(1, 5)) * (1 if rng.random() < 0.5 else -1)
            self._velocity.append((vy, vx))
        self._period = 2 * max(height, width)  # of the gradient, along the diagonal
        self._phase = int(rng.integers(0, self._period))
        self._speed = int(rng.integers(1, 4))  # diagonal pixels per frame
        self._diagonal = np.arange(height + width - 1, dtype=np.int64)

    def at(self, frame: int) -> npt.NDArray[np.int16]:
        """The texture offsets of frame ``frame``: a new int16 HxW array in +-amplitude."""
        out = np.zeros((self.height, self.width), dtype=np.int16)
        for tile, (vy, vx) in zip(self._tiles, self._velocity, strict=True):
            tile_h, tile_w = tile.shape[0] // 2, tile.shape[1] // 2
            y0 = (frame * vy) % tile_h
            x0 = (frame * vx) % tile_w
            out += tile[y0 : y0 + self.height, x0 : x0 + self.width]
        # A triangle wave along the diagonal, in integer arithmetic so that every platform
        # draws the same pixels (a float sine could round differently).
        position = (self._diagonal + self._phase + self._speed * frame) % self._period
        triangle = np.abs(2 * position - self._period)  # 0..period
        line = ((triangle * 2 * _GRADIENT) // self._period - _GRADIENT).astype(np.int16)
        # gradient[y, x] = line[y + x]: a read-only diagonal view, no HxW temporary.
        step = line.strides[0]
        out += as_strided(line, shape=(self.height, self.width), strides=(step, step))
        return out


def draw_frame(
    episode: int, frame: int, camera: int, height: int, width: int, *, texture: bool, seed: int
) -> U8Array:
    """Draw the synthetic RGB image (HWC uint8) of ``frame`` in ``episode`` for camera ``camera``.

    The image carries a marker that :func:`read_marker` decodes back to ``(episode, frame)``.
    ``camera`` only changes the colours; ``seed`` only changes the texture (when ``texture``).
    """
    painter = FramePainter(
        episode=episode, camera=camera, height=height, width=width, texture=texture, seed=seed
    )
    return painter.draw(frame)


def _as_hwc(image: npt.ArrayLike) -> tuple[npt.NDArray[np.generic], float]:
    """The image as an HxWxC (C in 1, 3, 4) array, and the factor that scales it to 0..255."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ConfigError(
            f"read_marker expects an HWC or CHW RGB image (or a 2-D grey image), got shape "
            f"{np.shape(image)}"
        )
    if np.issubdtype(arr.dtype, np.floating):
        return arr, 255.0
    if arr.dtype == np.uint8:
        return arr, 1.0
    raise ConfigError(
        f"read_marker expects uint8 pixels or floats in [0, 1], got dtype {arr.dtype}"
    )


def read_marker(image: npt.ArrayLike) -> tuple[int, int]:
    """Decode the ``(episode, frame)`` marker that :func:`draw_frame` drew into ``image``.

    ``image`` may be HWC or CHW, uint8 or float in [0, 1] (a numpy array or anything
    ``np.asarray`` accepts, such as a CPU tensor), at the drawn size or resized. Raises
    :class:`~framefeed.errors.DecodeError` when a cell is ambiguous or a check bit fails, which
    happens for blank, padding or heavily corrupted frames.
    """
    hwc, scale = _as_hwc(image)
    height, width, channels = hwc.shape
    if height < MARKER_ROWS or width < MARKER_COLS:
        raise ConfigError(f"image of {height}x{width} pixels is too small to hold a marker")
    weights = _LUMA * scale if channels >= 3 else np.array([scale])
    rows = _edges(height, MARKER_ROWS)
    cols = _edges(width, MARKER_COLS)
    means = np.empty((MARKER_ROWS, MARKER_COLS), dtype=np.float64)
    for r in range(MARKER_ROWS):
        y0, y1 = rows[r], rows[r + 1]
        dy = (y1 - y0) // 4
        for c in range(MARKER_COLS):
            x0, x1 = cols[c], cols[c + 1]
            dx = (x1 - x0) // 4
            # Luma is linear in RGB, so the mean luma of the cell centre is the luma of its
            # mean colour: no full-image float conversion.
            centre = hwc[y0 + dy : y1 - dy, x0 + dx : x1 - dx, : len(weights)]
            means[r, c] = float(centre.mean(axis=(0, 1), dtype=np.float64) @ weights)
    distance = np.abs(means - _THRESHOLD)
    if float(distance.min()) < _MARGIN:
        row, col = divmod(int(distance.argmin()), MARKER_COLS)
        raise DecodeError(
            f"frame marker unreadable: cell (row {row}, col {col}) has mean luma "
            f"{means[row, col]:.1f}, too close to the threshold {_THRESHOLD}; the image is not a "
            "synthetic frame, or it was blanked, padded or badly corrupted"
        )
    bits = [int(b) for b in (means.ravel() > _THRESHOLD)]
    data = bits[: EPISODE_BITS + FRAME_BITS]
    if bits[EPISODE_BITS + FRAME_BITS :] != _check_bits(data):
        raise DecodeError(
            "frame marker check bits do not match its data bits: the image is not a synthetic "
            "frame, or a cell was misread after heavy corruption"
        )
    episode = int("".join(map(str, data[:EPISODE_BITS])), 2)
    frame = int("".join(map(str, data[EPISODE_BITS:])), 2)
    return episode, frame
