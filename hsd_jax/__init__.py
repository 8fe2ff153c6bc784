"""hsd-jax."""
