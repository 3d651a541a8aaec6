"""nanoseek: the DeepSeek system (MLA, DeepSeekMoE, MTP, R1-style reasoning) in one compact codebase."""

__version__ = "0.1.0"
