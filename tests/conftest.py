"""Test settings: float32 matmuls at full precision; hypothesis without deadlines (jit)."""
import jax
from hypothesis import settings

jax.config.update('jax_default_matmul_precision', 'highest')
settings.register_profile('default', deadline=None, max_examples=15,
                          print_blob=True)
settings.load_profile('default')
