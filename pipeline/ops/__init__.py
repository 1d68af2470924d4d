"""Running the whole chain: `pipeline run`, `demo`, `submit` and the local service stack."""
