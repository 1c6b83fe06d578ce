"""Expert residency: the scheduler, the expert cache and its policies, the GPU tier, hardware
profiles and routing traces."""
