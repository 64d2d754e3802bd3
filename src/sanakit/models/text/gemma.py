"""Gemma-2 text encoder with Sana's complex human instruction (CHI).

Reproduces ``SanaPipeline.encode_prompt`` from diffusers exactly (tests compare bit for bit), so
embeddings cached at training time equal those the exported pipeline computes at inference:

* prompts are lower-cased and stripped (diffusers ``_text_preprocessing`` with
  ``clean_caption=False``);
* with CHI, the instruction lines are joined with newlines and prepended to every prompt; the
  sequence is right padded / truncated to ``len(tokens(CHI)) + L - 2`` and then token 0 (BOS) plus
  the last ``L - 1`` positions are kept, for the embeds and the mask alike (Sana paper, sec. 3.1);
* the negative / empty prompt is encoded without CHI, right padded to L, with its own mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModel

from sanakit.errors import ConfigError
from sanakit.models.text.base import PretrainedTextEncoder


class GemmaEncoder(PretrainedTextEncoder):
    """Gemma-2 decoder used as an encoder (last hidden state); bf16 on CUDA, fp32 on CPU."""

    kind = "gemma-2"
    cuda_default_dtype = torch.bfloat16

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        max_length: int | None = None,
        instruction: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype = "auto",
        name: str | None = None,
    ) -> None:
        if instruction is not None and (
            isinstance(instruction, str) or not all(isinstance(s, str) for s in instruction)
        ):
            raise ConfigError(
                "text_encoder.complex_human_instruction must be a list of strings (or null)"
            )
        if instruction and not "\n".join(instruction).strip():
            raise ConfigError(
                "text_encoder.complex_human_instruction is blank: give instruction lines or null"
            )
        if model is not None and hasattr(model, "get_decoder") and hasattr(model, "lm_head"):
            # A *ForCausalLM was passed: its first output would be logits, not hidden states.
            model = model.get_decoder()
        super().__init__(
            name_or_path,
            model=model,
            tokenizer=tokenizer,
            max_length=max_length,
            instruction=instruction,
            device=device,
            dtype=dtype,
            name=name,
        )
        self._chi_prompt: str | None = None
        self._chi_length = 0  # sequence length before selecting BOS + last L-1 positions
        if self.instruction:
            self._chi_prompt = "\n".join(self.instruction)
            n_chi = len(self.tokenizer.encode(self._chi_prompt))
            self._chi_length = n_chi + self.max_length - 2
            self._check_max_length(self._chi_length)

    def _model_class(self) -> Any:
        # AutoModel maps both Gemma2Model and Gemma2ForCausalLM checkpoints to Gemma2Model.
        return AutoModel

    def preprocess(self, prompts: list[str]) -> list[str]:
        """Lower-case and strip, as diffusers does before tokenizing (``clean_caption=False``)."""
        return [p.lower().strip() for p in prompts]

    def _forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        # use_cache=False: no KV cache is needed for a single forward and it costs memory.
        out = self.model(
            input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        )
        return out[0].to(dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if self._chi_prompt is None:
            return self._encode_plain(prompts)
        texts = [self._chi_prompt + p for p in self.preprocess(self._check_prompts(prompts))]
        if not texts:
            return self._empty()
        ids, mask = self._tokenize(texts, self._chi_length)
        embeds = self._forward(ids, mask)
        # BOS plus the last L-1 positions: the instruction body is dropped, its context remains.
        select = [0, *range(self._chi_length - self.max_length + 1, self._chi_length)]
        return embeds[:, select], mask[:, select].to(self.device)

    def encode_trimmed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Trimmed as the base class does, except with an instruction: then the full-length
        :meth:`encode`, because which positions are kept (BOS + the last L-1) depends on the
        padding."""
        if self._chi_prompt is not None:
            return self.encode(prompts)
        return super().encode_trimmed(prompts)
