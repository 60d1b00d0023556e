"""One PNG per `rf bench singleview` run: the photo, then the held-out views (ground truth
above, the reconstruction below), then 4 frames of the orbit video.

    python scripts/singleview_figure.py OUT.png RUN_FOLDER [RUN_FOLDER ...]

RUN_FOLDER is a benchmark's --out folder (it holds gt/ and run/); one row per folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch


def _row(folder: Path, size: int = 96) -> np.ndarray:
    from rf_core.evaluation.heldout import heldout_strip
    from rf_core.ground_truth.gt_render import load_gt
    from rf_core.jobs.run_loading import load_run

    recon, _ = load_run(folder / "run", device="cpu")
    gt = load_gt(folder / "gt")
    strip = heldout_strip(recon, gt, input_view=0, views=4, size=size)  # [2s, 4s, 3]
    photo = iio.imread(folder / "gt" / "rgb" / "000.png")[..., :3]
    photo = torch.nn.functional.interpolate(
        torch.from_numpy(photo).permute(2, 0, 1)[None].float(), size=(size, size),
        mode="area")[0].permute(1, 2, 0).numpy().astype(np.uint8)
    frames = iio.imread(folder / "run" / "orbit.gif", index=None)
    picks = [frames[int(i * len(frames) / 4)][..., :3] for i in range(4)]
    # the orbit GIF holds rgb | normals | depth side by side: keep the rgb panel
    picks = [f[:, : f.shape[1] // 3] for f in picks]
    picks = [torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float(),
        size=(size, size), mode="area")[0].permute(1, 2, 0).numpy().astype(np.uint8)
        for f in picks]
    white = np.full((size, size, 3), 255, np.uint8)
    left = np.concatenate([photo, white])
    orbit = np.concatenate([np.concatenate(picks[:2], 1), np.concatenate(picks[2:], 1)])
    gap = np.full((2 * size, size // 8, 3), 255, np.uint8)
    return np.concatenate([left, gap, strip, gap, orbit], 1)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    rows = [_row(Path(f)) for f in argv[1:]]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    Path(argv[0]).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(argv[0], np.concatenate(rows))
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
