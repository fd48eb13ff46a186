"""The structure every rollout backend returns (hf now, vllm later)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    """B = number of sampled responses, P = prompt length (left-padded), R = response length.

    prompt_ids [B, P], prompt_mask [B, P]: left-padded prompts (1 = real token).
    response_ids [B, R], response_mask [B, R]: right-padded responses; the mask covers every
        generated token up to and including the first EOS.
    logprobs [B, R]: behaviour log-probs of the sampled tokens under the tempered sampling
        distribution, log softmax(z / temperature); 0 where the mask is 0.
    texts: decoded responses (special tokens removed), length B.
    prompt_index [B]: which input prompt each response answers (for grouping).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    texts: list[str]
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with its tensors on `device`."""
        return RolloutBatch(
            prompt_ids=self.prompt_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
            logprobs=self.logprobs.to(device),
            texts=self.texts,
            prompt_index=self.prompt_index.to(device),
        )

    def trimmed(self) -> RolloutBatch:
        """The same rows without the columns no row uses: leading prompt padding and
        trailing response padding (at least one response column stays). A micro-batch of
        short responses then costs what its own tokens cost, not the longest response's of
        the whole batch; the kept tokens' logits do not change (causal attention, positions
        from the mask).

        >>> b = RolloutBatch(torch.tensor([[0, 0, 5], [0, 6, 7]]), torch.tensor([[0, 0, 1],
        ...     [0, 1, 1]]), torch.tensor([[8, 0, 0], [8, 9, 0]]), torch.tensor([[1, 0, 0],
        ...     [1, 1, 0]]), torch.zeros(2, 3), ["a", "b"], torch.tensor([0, 0]))
        >>> t = b.trimmed(); t.prompt_ids.tolist(), t.response_ids.tolist()
        ([[0, 5], [6, 7]], [[8, 0], [8, 9]])
        """
        used = self.prompt_mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.prompt_mask.shape[1]
        used = self.response_mask.any(dim=0).nonzero()
        width = max(int(used[-1]) + 1 if len(used) else 0, 1)
        return RolloutBatch(
            prompt_ids=self.prompt_ids[:, first:],
            prompt_mask=self.prompt_mask[:, first:],
            response_ids=self.response_ids[:, :width],
            response_mask=self.response_mask[:, :width],
            logprobs=self.logprobs[:, :width],
            texts=self.texts,
            prompt_index=self.prompt_index,
        )

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        """Rows `idx` [K] of the batch (for minibatching)."""
        rows = idx.tolist()
        idx = idx.to(self.response_ids.device)
        return RolloutBatch(
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            response_ids=self.response_ids[idx],
            response_mask=self.response_mask[idx],
            logprobs=self.logprobs[idx],
            texts=[self.texts[i] for i in rows],
            prompt_index=self.prompt_index[idx],
        )
