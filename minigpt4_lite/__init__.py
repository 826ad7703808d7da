"""minigpt4-lite: MiniGPT-4 (Zhu et al., ICLR 2024) rebuilt small enough to learn by running it."""

__version__ = "0.1.0"
