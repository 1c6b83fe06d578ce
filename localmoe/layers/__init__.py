"""The shared, parameterised pieces an architecture module (localmoe/archs/) builds its decoder
block from, one job per module:

    block.py      Block (norms + attention + FFN of one layer), the loader interface builders read
    rope.py       RoPE tables (plain, linear, YaRN) and the rotation (neox or adjacent pairs)
    attention.py  grouped-query attention: optional q/k/v/o biases, q/k norm kinds, sinks, window
    mla.py        DeepSeek's multi-head latent attention (absorbed, latent KV cache)
    routers.py    softmax → top-k, top-k → softmax, sigmoid + selection bias + expert groups
    moe.py        the MoE FFN: router → the expert function → (+ gated or plain shared expert)
    ffn.py        a dense gated FFN (a layer without experts, or a shared expert)

Nothing here imports localmoe.archs or the GGUF reader; ffn.py (which runs on compute/experts.py's
layout) is reached through the loader (model.FileWeights.ffn), never imported by an architecture.
"""
