"""tiny-cuda-nn's fused CUDA hash grid behind the same ``(x, params) -> features`` call.

tcnn keeps its parameters as one flat vector in exactly the layout of
:mod:`rf_core.scene.encoding.layout`, so :class:`~rf_core.scene.encoding.hashgrid.HashGridEncoding`
owns a single float32 ``params`` for every backend and hands it to tcnn per call; checkpoints and
tests move parameters between backends unchanged.
"""

from __future__ import annotations

import torch

from rf_core.scene.encoding.config import HashGridConfig
from rf_core.scene.encoding.layout import GridLayout


class TcnnHashGrid:
    """Callable ``(x [N, 3] on CUDA, params [n_params]) -> [N, L*F] float32``.

    A plain object, not an ``nn.Module``: tcnn's own parameter copy must not appear in the
    owner's ``state_dict`` or optimizer.
    """

    def __init__(self, cfg: HashGridConfig, layout: GridLayout, n_input_dims: int = 3):
        import tinycudann  # optional accelerator: imported only when this backend is chosen

        self.encoding = tinycudann.Encoding(n_input_dims, cfg.to_tcnn())
        n_tcnn = self.encoding.params.numel()
        if n_tcnn != layout.n_params:
            raise RuntimeError(f"tiny-cuda-nn allocates {n_tcnn} hash-grid parameters but our "
                               f"layout has {layout.n_params}; this tinycudann version lays the "
                               f"grid out differently, use backend 'torch'")
        # Our params replace tcnn's at every call; drop its copy to save GPU memory.
        self.encoding.params = torch.nn.Parameter(self.encoding.params.detach()[:0])

    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        # functional_call swaps in our parameter for this call only; tcnn casts it to its own
        # precision (fp16 by default) and autograd carries the gradient back to float32.
        out = torch.func.functional_call(self.encoding, {"params": params}, (x,))
        return out.float()
