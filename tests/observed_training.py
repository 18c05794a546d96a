"""A tiny observed training loop for end-to-end tests of exporters, dashboards and alerts.

A two-layer LM learns a fixed next-token rule on CPU; ``attach()`` observes every step with
reasoning/tool-call classes and two tools (bash, submit). ``collapse()`` and ``poison()`` turn
the model into a confidently wrong one or one with NaN logits, to drive the alerts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from agent_obs import TokenClass, attach
from agent_obs.exporters import Exporter
from agent_obs.tools import NO_TOOL, tool_id

VOCAB, DIM, BATCH, SEQ = 64, 32, 4, 24
TOOLS = ("bash", "submit")


class TinyLM(nn.Module):
    """Embedding -> ReLU MLP -> ``lm_head``: enough to learn ``next = (3 * tok + 1) % VOCAB``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU())
        self.lm_head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mlp(self.embed(tokens)))


class ObservedTraining:
    """The model, its optimizer and an attached observer exporting to ``exporters``."""

    def __init__(
        self, exporters: Sequence[Exporter], *, seed: int = 0, lr: float = 0.02, anatomy: bool = False
    ) -> None:
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.model = TinyLM()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.observer = attach(self.model, layer="lm_head", exporters=exporters, topk=(1, 5))
        self.step = 0
        self.anatomy = anatomy  # also pass tool_args (odd tool-call positions) and one sample id per row
        self.rows_seen = 0

    def batch(self) -> tuple[torch.Tensor, ...]:
        """Tokens, labels, classes (first half reasoning, second half a tool call) and tool ids.

        Reasoning labels are random 40 % of the time, so reasoning keeps a higher entropy than tool calls.
        """
        classes = torch.full((BATCH, SEQ), int(TokenClass.REASONING))
        classes[:, SEQ // 2 :] = int(TokenClass.TOOL_CALL)
        half = VOCAB // 2  # reasoning inputs in [0, half), tool-call inputs in [half, VOCAB)
        tokens = torch.randint(0, half, (BATCH, SEQ), generator=self.generator) + half * (
            classes == TokenClass.TOOL_CALL
        )
        labels = (3 * tokens + 1) % VOCAB
        noisy = (torch.rand(BATCH, SEQ, generator=self.generator) < 0.4) & (classes == TokenClass.REASONING)
        labels = torch.where(noisy, torch.randint(0, VOCAB, (BATCH, SEQ), generator=self.generator), labels)
        ids = torch.tensor([tool_id(TOOLS[row % len(TOOLS)]) for row in range(BATCH)]).unsqueeze(1)
        tool_ids = torch.where(classes == TokenClass.TOOL_CALL, ids, NO_TOOL)
        return tokens, labels, classes, tool_ids

    def _targets(self, labels, classes, tool_ids) -> dict:
        """observe()'s keyword arguments for one batch (with the anatomy: tool_args and sample ids)."""
        targets = {"labels": labels, "token_classes": classes, "tool_ids": tool_ids}
        if self.anatomy:
            odd = (torch.arange(SEQ) % 2 == 1).expand(BATCH, SEQ)
            targets["tool_args"] = (odd & (classes == TokenClass.TOOL_CALL)).long()
            targets["sample_ids"] = [f"row{self.rows_seen + i}" for i in range(BATCH)]
            self.rows_seen += BATCH
        return targets

    def train_step(self) -> dict[str, float]:
        """One optimizer step, observed and collected as split "train"."""
        tokens, labels, classes, tool_ids = self.batch()
        with self.observer.observe(**self._targets(labels, classes, tool_ids)):
            logits = self.model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return self.observer.collect("train", step=self.step)

    @torch.no_grad()
    def eval_step(self, split: str = "val") -> dict[str, float]:
        """One observed forward without training, collected as ``split`` at the current step."""
        tokens, labels, classes, tool_ids = self.batch()
        with self.observer.observe(**self._targets(labels, classes, tool_ids)):
            self.model(tokens)
        return self.observer.collect(split, step=self.step)

    @torch.no_grad()
    def collapse(self) -> None:
        """All mass on token 0 whatever the input: entropy ~0 nats, accuracy ~1/VOCAB."""
        self.model.lm_head.bias[0] = 1e4

    @torch.no_grad()
    def poison(self) -> None:
        """NaN logits on every row (each token then counts as non-finite)."""
        self.model.lm_head.bias[1] = float("nan")

    def close(self) -> None:
        self.observer.detach()
