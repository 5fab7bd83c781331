"""Sigma schedules, samplers (pure functions), the name table, denoiser wrappers, noise sources."""
