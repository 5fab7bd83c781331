"""Sigma schedules, samplers (pure functions), the name table, denoiser wrappers, noise sources.

``names`` (torch-free table of samplers and schedules), ``schedules`` (sigma lists, the
model's discrete schedule, the img2img cut), ``samplers`` (``run_sampler`` and every sampler),
``denoisers`` (ε / v / LCM wrappers, classifier-free guidance), ``noise`` and ``philox``
(A1111 seeds → noise). Nothing is imported here, so ``import underpaint.sampling.names``
stays free of torch.
"""
