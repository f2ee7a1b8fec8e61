"""Types that cross the seam between the MoE layer and the decoder model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PassageMemory:
    """Retrieved passages, encoded, for the retrieval expert to read.

    states: [B, P, H] passage token states (same hidden size as the decoder);
    mask:   [B, P] bool, True where a real passage token is (False = padding / no passage).
    A sequence whose mask is all False has no passages: the retrieval expert is masked out for it.
    """

    states: torch.Tensor
    mask: torch.Tensor


@dataclass
class MoEAux:
    """Side outputs of one MoE layer's forward pass.

    router_logits:      [N, E_total] fp32 router logits for the N = B*T tokens; when the layer has a
                        retrieval expert its logit is the LAST column (computed even when masked).
    aux_loss, z_loss:   scalar tensors (unscaled by their coefficients), over the real tokens only when the
                        layer was given an attention mask (the decoder always passes it), so padding does
                        not count.
    tokens_per_expert:  [E_total] how many token-slots each expert received, padding included: it is the
                        work the experts did (dispatch counts), not a routing statistic of the text.
    retrieval_affinity: [B, T] softmax probability of the retrieval slot over all slots (unmasked), or
                        None when the layer has no retrieval expert. The pipeline's probe averages it over
                        every prompt token (chat template included: Probe.retrieval_affinity) and, on the
                        native backend, over the question's tokens alone (Probe.question_router).
    dropped_tokens:     token-slots dropped by capacity (0 when dropless).
    """

    router_logits: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    retrieval_affinity: torch.Tensor | None = None
    dropped_tokens: int = 0
