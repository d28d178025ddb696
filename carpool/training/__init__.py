"""Training carpool's own model classes: corpus, tokenizer, packed data, loss, trainer, checkpoints.

One concern per module, applied to the model from outside (as torchtitan does): the model classes are the
same ones that serve, built with `ModelRuntime.for_training()`; parallelism, activation checkpointing and
compilation wrap them without changing them.
"""
