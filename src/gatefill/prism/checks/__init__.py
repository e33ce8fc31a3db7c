"""The PRISM job's checks: the production health checks, the staging soak's checks and what the soak reads from the
app's own metrics."""
