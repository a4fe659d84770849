"""ST2SI (Learning Transition Patterns by LLMs for Sequential Recommendation) as a RecBole plugin."""

__version__ = "0.1.0"
