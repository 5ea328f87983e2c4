"""prefix-dpo: DPO and preference training in JAX/Flax with prefix sharing."""
