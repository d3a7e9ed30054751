"""The ladder's models: specs come from config, files from pull, answers from backends.

Nothing under models/ knows about clusters or routing.
"""
