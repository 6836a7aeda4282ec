"""Images for TensorBoard, drawn with torch alone (matplotlib's colour maps and Pillow's text when installed)."""

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["as_images", "colorize", "heatmap", "markdown_table", "neighbor_grid"]

TILE = 48  # pixels per image tile
BAR = 5  # height of the similarity bar under a tile
GAP = 2


def as_images(batch: Any) -> Optional[Tensor]:
    """The inputs of a batch when they are images ``(B, C, H, W)`` with C in 1 or 3, else ``None``."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, dict):
        x = next((v for k, v in x.items() if k in ("x", "image", "images", "input", "inputs")), None)
    if isinstance(x, Tensor) and x.ndim == 4 and x.shape[1] in (1, 3) and x.is_floating_point():
        return x
    return None


def _fit(images: Tensor) -> Tensor:
    """``(N, 3, TILE, TILE)`` in [0, 1]: each image scaled to its own range, resized (nearest), grey to RGB."""
    x = images.detach().float().cpu()
    low = x.flatten(1).amin(1)[:, None, None, None]
    high = x.flatten(1).amax(1)[:, None, None, None]
    x = (x - low) / (high - low).clamp_min(1e-12)
    x = torch.nn.functional.interpolate(x, size=(TILE, TILE), mode="nearest")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def colorize(values: Tensor, low: float, high: float) -> Tensor:
    """``(3, *values.shape)`` RGB in [0, 1]: viridis when matplotlib is installed, else a blue-white-red ramp."""
    t = ((values.float().cpu() - low) / (high - low)).clamp(0, 1)
    try:
        import matplotlib

        table = torch.tensor(matplotlib.colormaps["viridis"](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)
        return table[(t * 255).round().long()].movedim(-1, 0)
    except ImportError:
        blue, white, red = torch.tensor([0.23, 0.30, 0.75]), torch.ones(3), torch.tensor([0.71, 0.02, 0.15])
        lower = blue[:, None] + (white - blue)[:, None] * (2 * t.flatten()).clamp(max=1)[None]
        upper = white[:, None] + (red - white)[:, None] * (2 * t.flatten() - 1).clamp(min=0)[None]
        return torch.where(t.flatten()[None] <= 0.5, lower, upper).reshape(3, *t.shape)


def _text(canvas: Tensor, items: list[tuple[int, int, str]], fill: tuple[int, int, int] = (255, 255, 0)) -> Tensor:
    """Write small labels on a ``(3, H, W)`` canvas with Pillow when it is installed (else unchanged)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return canvas
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    for x, y, text in items:
        draw.text((x, y), text, fill=fill)
    import numpy as np

    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255


def neighbor_grid(
    queries: Tensor,
    neighbors: Tensor,
    similarities: Tensor,
    query_labels: Optional[Tensor] = None,
    neighbor_labels: Optional[Tensor] = None,
) -> Tensor:
    """``(3, H, W)`` grid: one row per query, the query then its neighbors, a similarity bar under each.

    The bar under a neighbor fills in proportion to its similarity (green, from 0
    to 1; red for negative values); with Pillow the value and the label are also written.
    """
    q, k = neighbors.shape[:2]
    tiles = _fit(torch.cat([queries[:, None], neighbors], 1).flatten(0, 1)).reshape(q, k + 1, 3, TILE, TILE)
    cell_h, cell_w = TILE + BAR + GAP, TILE + GAP
    canvas = torch.zeros(3, q * cell_h, (k + 1) * cell_w)
    notes: list[tuple[int, int, str]] = []
    for r in range(q):
        for c in range(k + 1):
            top, left = r * cell_h, c * cell_w
            canvas[:, top : top + TILE, left : left + TILE] = tiles[r, c]
            if c == 0:
                canvas[:, top + TILE : top + TILE + BAR, left : left + TILE] = torch.tensor([0.3, 0.5, 1.0])[:, None, None]
                label = "" if query_labels is None else f" y={int(query_labels[r])}"
                notes.append((left + 1, top + 1, f"query{label}"))
                continue
            value = float(similarities[r, c - 1])
            width = int(round(abs(value) * TILE))
            color = torch.tensor([0.2, 0.9, 0.2] if value >= 0 else [0.9, 0.2, 0.2])[:, None, None]
            canvas[:, top + TILE : top + TILE + BAR, left : left + width] = color
            label = "" if neighbor_labels is None else f" y={int(neighbor_labels[r, c - 1])}"
            notes.append((left + 1, top + 1, f"{value:.2f}{label}"))
    return _text(canvas, notes)


def heatmap(matrix: Tensor, low: float = -1.0, high: float = 1.0, cell: int = 4) -> Tensor:
    """``(3, H, W)``: the matrix in colour (``cell`` pixels per entry) with a colour scale on the right."""
    m = matrix.shape[0]
    body = colorize(matrix, low, high).repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    scale = colorize(torch.linspace(high, low, m * cell)[:, None].expand(-1, 12), low, high)
    canvas = torch.ones(3, m * cell, m * cell + 8 + 12 + 40)
    canvas[:, :, : m * cell] = body
    canvas[:, :, m * cell + 8 : m * cell + 20] = scale
    canvas = _text(canvas, [(m * cell + 22, 0, f"{high:+.1f}"), (m * cell + 22, m * cell - 12, f"{low:+.1f}")], fill=(0, 0, 0))
    return canvas


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
