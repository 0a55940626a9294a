"""Benchmarks of peftsurgery against Hugging Face PEFT: same model, data and seed, in one process, interleaved.

Run `python -m benchmarks.run --help`.
"""
