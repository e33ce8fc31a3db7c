"""The PRISM job: discovery, exact scoring, processing and its checks (checks/); the platform stand-in (platform/);
sample data for the demo, tests and benchmarks (sandbox/)."""
