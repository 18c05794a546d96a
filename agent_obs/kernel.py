"""Per-row statistics of a chunk of logits: the only place the vocabulary is read.

``row_stats`` turns ``[N, V]`` logits into ``[N, NUM_ROW_STATS + len(topk)]`` float32
columns (see ``ROW_*``) without materialising a full fp32 softmax of more than one chunk.
"""

from __future__ import annotations

import torch

ROW_ENTROPY, ROW_NLL, ROW_CORRECT, ROW_FINITE = 0, 1, 2, 3
NUM_ROW_STATS = 4  # then one top-k mass column per k, in the order of ``topk``


def row_stats(logits: torch.Tensor, labels: torch.Tensor | None, topk: tuple[int, ...]) -> torch.Tensor:
    """Entropy, label NLL, argmax==label, finiteness and top-k masses of each row, in fp32.

    ``labels`` may hold any value where the caller will not select the row (it is clamped);
    rows without labels get NLL 0 and correct 0. A row is finite when it has no NaN/+inf
    and not every entry is -inf.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    finite = torch.isfinite(lse.squeeze(-1)) & ~torch.isnan(x).any(-1)
    logp = x - lse
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    kmax = min(max(topk), x.shape[-1])
    top_p, top_i = p.topk(kmax, dim=-1)
    csum = top_p.cumsum(-1)
    masses = [csum[:, min(k, kmax) - 1] for k in topk]
    if labels is None:
        nll = torch.zeros_like(entropy)
        correct = torch.zeros_like(entropy)
    else:
        idx = labels.clamp(0, x.shape[-1] - 1).long().unsqueeze(-1)
        nll = -logp.gather(-1, idx).squeeze(-1)
        correct = (top_i[:, 0] == idx.squeeze(-1)).float()
    return torch.stack([entropy, nll, correct, finite.float(), *masses], dim=-1)
