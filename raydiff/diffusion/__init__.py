"""The flow-matching math below the model families: timestep shifts and densities, noising, targets,
loss weights (`flow_matching`), and the supervised loss over a pipeline's `model_fn` (`loss`).
Formulas and their sources: docs/flow_matching.md."""
