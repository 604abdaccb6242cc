"""The demos: the main job end to end on the embedded digits.

`pixel` — `slimdiff demo`: a digits teacher, one shipped recipe per engine, one evaluation and HTML report.
`latent` — `slimdiff demo --latent`: the latent recipes on a tiny Stable Diffusion pipeline trained on the digits
(`LatentBench`, shared with `benchmarks/latent.py`).
"""
