"""Data side of the plugin: the text-aware dataset, its dataloaders and the data converters."""
