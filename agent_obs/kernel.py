"""Per-row statistics of chunks of logits in one cache-resident pass: the only place the vocabulary is read.

Design (measured in ``bench/metrics_kernel.py``): the row is cut into blocks of ``BLOCK`` logits.
Pass 1 (``block_stats``) reads each block once and, while it sits in L1, produces its max,
``sum exp(x - max)`` and ``sum exp(x - max) * (x - max)`` (exp once per logit). Pass 2
(``finish_row_stats``) combines the ``[N, V / BLOCK]`` triples like an online softmax into the exact
full-vocabulary logsumexp and entropy. The block maxima also locate the top-k: the ``k`` blocks
with the largest maxima hold the ``k`` largest logits (a block outside them has ``k`` maxima at
least as large before it), so ``torch.topk`` runs on ``k x BLOCK`` gathered candidates instead of
the row, and the first argmax comes from the first block attaining the row max.

Everything is plain torch ops compiled by ``torch.compile`` (inductor): a C++/OpenMP kernel on
CPU, Triton on GPU, from the same code, ~12 s of compile on a cold cache here. The two passes are
separate graphs because inductor otherwise splits pass 1 into two loops (two reads of the
logits). The token dim is marked dynamic, so a new number of rows never recompiles. The first
vocabulary is compiled static (the fastest code: a symbolic vocabulary measured ~7-10% slower on
CPU); a second size makes dynamo recompile with the vocabulary dynamic (automatic dynamic shapes),
and every later size of its class reuses that graph (classes: ``V % BLOCK == 0`` or not; tiny
vocabularies add a few). So a process compiles at most three variants per logits dtype and set of
given targets (labels, classes, tool ids; tool-argument masks and per-sample rows add none); should
dynamo still hit its recompile limit, every kernel runs eagerly from then on, on eager-sized calls,
after one warning. 0/1-row calls (sizes the compiler would specialise) run eagerly. Alternatives measured and dropped:
fused masked-max rounds instead of ``torch.topk`` (slower here, +40% compile time), one graph
(two reads), unbacked sizes and a shared ``exp`` buffer (both materialise a full-size exp(x)).
A hand-written ``cpp_extension`` kernel would be CPU-only and a second implementation to test.
Without a compiler, or with ``AGENT_OBS_COMPILE=0``, the same functions run eagerly (a compile
failure warns once), on smaller chunks (``EAGER_SPLIT``): eager ops materialise fp32 temporaries.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable

import torch

ROW_ENTROPY, ROW_NLL, ROW_CORRECT, ROW_FINITE = 0, 1, 2, 3
NUM_ROW_STATS = 4  # then one top-k mass column per k, in the order of ``topk``
BLOCK = 128  # logits per block: one block of fp32 is 8 AVX-512 registers / 4 warps' loads
EAGER_SPLIT = 16  # eager ops keep ~6 fp32 temporaries of their rows (8 for half inputs): 1/16 of a chunk
COMPILED_ROWS = 4  # at most 4 chunks of rows per compiled call (see rows_per_call)
# Pass 2 is ~5% of the work but ~10 OpenMP barriers per call; on a busy CPU each barrier can wait out a
# scheduler slice (measured: 45-110 ms per 2048 rows with 2 threads vs 13-19 ms with 1), so its C++ runs serially.
PASS2_OPTIONS = {"cpp.threads": 1}
COMPILE_LOGGER = logging.getLogger("agent_obs.kernel")
_UNDERFLOW = -200.0  # exp(-200) == 0 in fp32: clamping differences there is exact and avoids 0 * -inf


def block_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1, the only full read of ``[N, V]`` logits: per block of ``BLOCK`` logits (``[N, V // BLOCK]`` each)
    the max, ``sum exp(x - max)`` and ``sum exp(x - max) * (x - max)``, in fp32; a tail shorter than a block is
    left to ``finish_row_stats``."""
    n, vocab = logits.shape
    blk = min(BLOCK, vocab)
    nblk = vocab // blk
    return _block_stats(logits[:, : nblk * blk].view(n, nblk, blk).float())


def finish_row_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    bmax: torch.Tensor,
    bsum: torch.Tensor,
    bdot: torch.Tensor,
    topk: tuple[int, ...],
) -> torch.Tensor:
    """Pass 2, on ``block_stats``' output and a few gathered blocks: ``[N, NUM_ROW_STATS + len(topk)]`` fp32.

    Entropy, label NLL, argmax==label, finiteness and top-k masses of each row. ``labels`` may
    hold any value on rows the caller will not select (it is clamped); rows without labels get
    NLL 0 and correct 0. A row is finite when it has no NaN/+inf and not every entry is -inf;
    other rows hold garbage.
    """
    n, vocab = logits.shape
    blk = min(BLOCK, vocab)
    nblk = vocab // blk
    main = nblk * blk
    xb = logits[:, :main].view(n, nblk, blk)
    tail = logits[:, main:].float() if main < vocab else None
    if tail is not None:
        tmax, tsum, tdot = _block_stats(tail.unsqueeze(1))
        bmax_all, bsum, bdot = (torch.cat(p, dim=1) for p in ((bmax, tmax), (bsum, tsum), (bdot, tdot)))
    else:
        bmax_all = bmax
    row_max = bmax_all.amax(-1)
    finite = torch.isfinite(row_max)
    m = torch.where(finite, row_max, 0.0)
    shift = torch.where(torch.isfinite(bmax_all), bmax_all - m[:, None], 0.0).clamp(min=_UNDERFLOW)
    w = shift.exp()
    s = (w * bsum).sum(-1)  # sum exp(x - m) >= 1 on finite rows
    t = (w * (bdot + bsum * shift)).sum(-1)  # sum exp(x - m) * (x - m) <= 0: no cancellation
    log_s = s.log()
    entropy = log_s - t / s

    kmax = min(max(topk), vocab)
    kblk = min(kmax, nblk)
    blocks = bmax.topk(kblk, dim=-1).indices
    cand = xb.gather(1, blocks[:, :, None].expand(n, kblk, blk)).reshape(n, kblk * blk).float()
    if tail is not None:
        cand = torch.cat((cand, tail), dim=1)
    top = cand.topk(kmax, dim=-1).values  # ties come out repeated, as in the full row
    csum = ((top - m[:, None]).clamp(min=_UNDERFLOW) - log_s[:, None]).exp().cumsum(-1)
    masses = [csum[:, min(k, kmax) - 1] for k in topk]

    if labels is None:
        nll = torch.zeros_like(entropy)
        correct = torch.zeros_like(entropy)
    else:
        lab = labels.long().clamp(0, vocab - 1)
        x_label = logits.gather(1, lab[:, None]).squeeze(1).float()
        nll = log_s - (x_label - m)  # = logsumexp - x_label, without subtracting two large numbers
        correct = (_first_argmax(xb, bmax_all, tail, nblk, blk) == lab).float()
    return torch.stack([entropy, nll, correct, finite.float(), *masses], dim=-1)


def _block_stats(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max, ``sum exp(x - max)`` and ``sum exp(x - max) * (x - max)`` over the last dim of fp32 blocks."""
    bmax = xb.amax(-1)
    base = torch.where(torch.isfinite(bmax), bmax, 0.0)
    d = (xb - base[..., None]).clamp(min=_UNDERFLOW)
    # exp(d) written twice on purpose: inductor then emits one loop with one exp and two accumulators;
    # a shared ``e`` is materialised (a full-size buffer when rows are strided, i.e. V % BLOCK != 0).
    return bmax, d.exp().sum(-1), (d.exp() * d).sum(-1)


def _first_argmax(
    xb: torch.Tensor, bmax_all: torch.Tensor, tail: torch.Tensor | None, nblk: int, blk: int
) -> torch.Tensor:
    """Index of the first maximum of each row (as ``torch.argmax``), from the first block attaining it."""
    first_block = bmax_all.argmax(-1)
    in_main = first_block.clamp(max=nblk - 1)
    block = xb.gather(1, in_main[:, None, None].expand(-1, 1, blk)).squeeze(1)
    idx = in_main * blk + block.float().argmax(-1)
    if tail is None:
        return idx
    return torch.where(first_block == nblk, nblk * blk + tail.argmax(-1), idx)


_announced: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) whose compile was logged


class Fused:
    """``fn`` compiled with the token dim dynamic and the others dynamic once they change; eager when compile
    is off or fails.

    Calls with fewer than 2 rows run eagerly (the compiler specialises sizes 0 and 1, so compiling
    them would recompile), ``AGENT_OBS_COMPILE=0`` selects eager mode, and a compile failure warns
    once and stays eager. Reaching dynamo's recompile limit (``limit_hit``, one switch for every
    kernel) warns once and turns ``compiling`` False for all of them instead of dynamo's silent
    per-call fallback, so callers size their calls for eager ops.
    """

    limit_hit = False  # dynamo's recompile limit was reached: every kernel eager from then on

    def __init__(self, fn: Callable[..., torch.Tensor], *, options: dict | None = None) -> None:
        self.fn = fn
        self._compiled = torch.compile(fn, dynamic=None, options=options)  # None: automatic dynamic on a change
        self._failed = False  # the compiler failed
        functools.update_wrapper(self, fn)

    @property
    def compiling(self) -> bool:
        """Whether calls (of >= 2 rows) run the compiled kernel; if not, callers should pass smaller chunks."""
        return not self._failed and not Fused.limit_hit and os.environ.get("AGENT_OBS_COMPILE", "1") != "0"

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not self.compiling or tensors[0].shape[0] < 2:
            return self.fn(*args, **kwargs)
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        key = (tensors[0].device.type, tensors[0].dtype)
        if key not in _announced:
            _announced.add(key)
            COMPILE_LOGGER.info(
                "agent_obs: compiling the metric kernel for %s logits on %s (once per process; "
                "obs.warmup() does it before training)",
                key[1],
                key[0],
            )
        config = torch._dynamo.config  # set directly: config.patch() costs ~0.5 ms per call
        fail_before, config.fail_on_recompile_limit_hit = config.fail_on_recompile_limit_hit, True
        try:  # no_grad: grad mode is guarded, so the hook's and compute_metrics' calls share one variant
            with torch.no_grad():
                return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            Fused.limit_hit = True
            warnings.warn(
                f"agent_obs: torch.compile of {self.fn.__name__} reached dynamo's recompile limit "
                f"(torch._dynamo.config.recompile_limit={torch._dynamo.config.recompile_limit}) on "
                f"{_signature(args)}: the metric kernels run eagerly from now on in this process (slower, "
                "smaller calls). Each logits dtype and set of given targets compiles up to three variants; "
                "raise the limit if this process needs that many",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args, **kwargs)
        except Exception as exc:  # any compiler/toolchain failure; a genuine input error re-raises from eager
            self._failed = True
            warnings.warn(
                f"agent_obs: torch.compile of {self.fn.__name__} failed ({type(exc).__name__}: {exc}); "
                "using eager torch ops (slower, smaller chunks). Set AGENT_OBS_COMPILE=0 to skip compiling.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args, **kwargs)
        finally:
            config.fail_on_recompile_limit_hit = fail_before


def _signature(args: tuple) -> str:
    """The call in words for the fallback warning: each tensor's dtype and shape, the other arguments as they are."""
    return ", ".join(f"{a.dtype}{list(a.shape)}" if isinstance(a, torch.Tensor) else repr(a) for a in args)


def rows_per_call(chunk_tokens: int, vocab: int, kmax: int, compiling: bool) -> int:
    """Rows per kernel call that keep extra memory below ``chunk_tokens x V x 4`` bytes.

    Eager ops hold ~6 fp32 copies of their rows; the compiled kernels hold ~``8 V / BLOCK`` block
    stats plus two copies of the ``min(kmax x BLOCK, V)`` top-k candidates per row, so a large
    vocabulary gets up to ``COMPILED_ROWS`` chunks per call (fewer calls) and a small one less.
    """
    if not compiling:
        return max(1, chunk_tokens // EAGER_SPLIT)
    per_row = 2 * min(kmax * BLOCK, vocab) + 8 * (vocab // BLOCK + 1) + 64
    return max(1, min(chunk_tokens * COMPILED_ROWS, chunk_tokens * vocab // per_row))


fused_block_stats = Fused(block_stats)
_fused_finish = Fused(finish_row_stats, options=PASS2_OPTIONS)


def row_stats(logits: torch.Tensor, labels: torch.Tensor | None, topk: tuple[int, ...]) -> torch.Tensor:
    """Entropy, NLL, correct, finite and top-k masses of ``[N, V]`` logits (see ``finish_row_stats``), fused."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, NUM_ROW_STATS + len(topk), dtype=torch.float32)
    return _fused_finish(logits, labels, *fused_block_stats(logits), tuple(topk))
