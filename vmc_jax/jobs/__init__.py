"""The jobs: every command's work, and the only layer that reads a job's ConfigDict."""
