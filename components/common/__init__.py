"""What the steps in `components/` are built from: no module here imports a step."""
