"""The modules meft_fx puts into a model: adapters, dropout drawn with torch.rand, chunked attention.

    adapter     Adapter (Linear d→r → act → dropout → Linear r→d), AdapterOnly, NoUpdate
    dropout     Dropout / keep_mask / apply_mask
    attention   AttentionWithDropout / chunked_attention
    causal      masked_sdpa: SDPA with a boolean mask, on the causal kernel when the mask is causal
    gated       gated_act: act(gate) * up keeping two tensors for the backward (SwiGLU, GEGLU)
    experts     grouped_mm: routed experts' grouped product, computing only the wanted gradients
"""
