"""Support for the tests and benchmarks: synthetic exports with exact, known probabilities."""
