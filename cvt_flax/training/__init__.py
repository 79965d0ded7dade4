"""Training building blocks (optimizer, sharding, steps, checkpoints, metrics); see train_lib."""
