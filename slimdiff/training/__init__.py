"""Training: the one loop, its losses and its schedules.

`loop` — `train`, the training loop (accelerate): teacher training, fine-tuning and distillation, resumable.
`conditioning` — how dataset labels become the model's condition (class labels, prompt embeddings).
`diffusion` — schedulers (DDPM, DDIM, DPM-Solver via diffusers), the training target and loss, guided sampling.
`distill` — output- and feature-KD losses, hook-based feature capture.
"""
