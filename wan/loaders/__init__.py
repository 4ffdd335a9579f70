"""One module per model: detect the checkpoint layout from its keys, convert names to
ours, infer the configuration from shapes, build the model on ``meta`` and fill it."""
