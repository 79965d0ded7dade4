"""What the commands, training and evaluation share to run a model on devices: the platforms a
process starts (`platforms`), compiling with the platform's options (`compiler`), the mesh and
shardings (`sharding`), the split model and the eval step (`eval_step`), and evaluation over a
dataset (`evaluation`, which reads data through TensorFlow: import it only where data is read)."""
