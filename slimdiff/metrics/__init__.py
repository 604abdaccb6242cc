"""Measurement: cost (params, MACs, latency) and quality (FID/KID, CLIP score)."""
