"""Sample PRISM data for the demo, the tests and the benchmarks: seeded scenarios and simulated live traffic."""
