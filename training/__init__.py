"""Tidal's trainer: a tiny ZAYA1 code model, AR-pretrained then TiDAR-converted, on CPU.

    python -m training.pipeline --out runs/zaya-code [--hours H]
    python -m training.export --run runs/zaya-code --out models/zaya-code-tiny

Modules, one job each: data (stdlib corpus + split), tokenizer (byte-level BPE), model (config + init),
windows (deterministic batches of token windows), batches (layouts -> model inputs), losses (AR and TiDAR
objectives), optim (AdamW + schedule), balance (expert load balancing), checkpoint (save / resume), evaluate
(held-out metrics), train (the step loop of one phase), export + card (HF-format model dir and its README),
pipeline (the whole run).
"""
