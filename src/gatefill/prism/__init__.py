"""The PRISM job: schema, exact scoring, discovery, checks, demo data."""
